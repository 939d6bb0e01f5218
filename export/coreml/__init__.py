"""Core ML: conversion, checks of a package, bundles, byte-stable packages."""
