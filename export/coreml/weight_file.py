"""Which constants a package keeps in its weight file: the same rule for every deployment target.

coremltools' ``should_use_weight_file`` (coremltools/converters/mil/backend/mil/load.py) puts a
constant of 10 or more elements in ``weight.bin`` when its type is float16/float32/uint8/int8 and, from
iOS18 on, int16/uint16/int32/uint32 too. A decode's cache-slot index vector (``decode_slots`` in
export/models/decoder_lm.py: ``arange(T)``, int32 [1,1,T,1]) is such a constant, so every decode T of an
iOS18 model would get a weight file of its own: one more copy of the part's weights per T, and a bundle
that cannot share its leaves' file (export/coreml/bundle.py, ``share_leaf_weights``).

``integer_constants_inline()`` keeps those integer constants in the spec (an immediate value) while a
package is serialized, as coremltools does for iOS15..iOS17: every leaf of a part (prefill and decode,
every T) then has the same weight file whatever its target. The weights themselves (float, int8/uint8,
and the compression ops' data) go to the file exactly as before; the program and its values are
unchanged, only where the integer constants are stored.

Why not a model without the T-sized constant: it would have to come from a T-sized run-time tensor, and a
range over a static size is a constant to torch.export and coremltools alike; the ops that avoid one
(``one_hot`` and ``cumsum`` of the position, say) would change the op set of every decode package on every
target (export/coreml/interpreter.py has no ``one_hot``) for a storage detail of iOS18's.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

_LOCK = threading.RLock()  # one patch at a time in a process: a thread's restore never cuts another's conversion short


@contextmanager
def integer_constants_inline():
    """While inside: coremltools' MIL exporter decides weight file or spec as for iOS17 (the same float and
    8-bit types in the file, integer types of 16 and 32 bits in the spec). Threads of one process that
    convert at once take turns (a worker runs one step at a time anyway)."""
    from coremltools import _SPECIFICATION_VERSION_IOS_17 as IOS17  # the last that keeps them in the spec
    from coremltools.converters.mil.backend.mil import load

    with _LOCK:
        original = load.should_use_weight_file

        def as_ios17(val, specification_version=IOS17):
            return original(val, min(specification_version, IOS17))

        load.should_use_weight_file = as_ios17
        try:
            yield
        finally:
            load.should_use_weight_file = original
