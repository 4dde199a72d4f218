//! The checkpoint coordinator (to be written: see the brief).
