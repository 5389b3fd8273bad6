#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| hsm_fuzz::audit(data));
