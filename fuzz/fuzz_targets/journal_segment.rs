#![no_main]
//! See `engine::fuzzing::journal_segment`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| engine::fuzzing::journal_segment(data));
