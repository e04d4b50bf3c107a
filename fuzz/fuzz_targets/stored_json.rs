#![no_main]
//! See `engine::fuzzing::stored_json`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| engine::fuzzing::stored_json(data));
