#![no_main]
//! See `nbd_server::fuzzing::nbd_tls_options`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| nbd_server::fuzzing::nbd_tls_options(data));
