#![no_main]
//! See `engine::fuzzing::cache_index`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| engine::fuzzing::cache_index(data));
