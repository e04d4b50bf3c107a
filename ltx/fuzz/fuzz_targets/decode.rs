//! Feeds arbitrary bytes to every LTX parsing entry point. Any panic, hang or unbounded
//! allocation is a bug: corrupt files must produce errors.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ltx::page_index::TAIL_LEN;
use ltx::{Decoder, PageIndex};

fuzz_target!(|data: &[u8]| {
    // Streaming decode and full verification.
    if let Ok(mut decoder) = Decoder::new(data) {
        let page_size = decoder.header().page_size as usize;
        let mut page = vec![0u8; page_size];
        while let Ok(Some(_)) = decoder.next_page(&mut page) {}
        let _ = decoder.finish();
    }
    // Random-access path: index location and parsing from the tail, and single frames.
    if data.len() >= TAIL_LEN {
        if let Ok((start, len)) = PageIndex::locate(data.len() as u64, &data[data.len() - TAIL_LEN..]) {
            if let (Ok(start_usize), Ok(len_usize)) = (usize::try_from(start), usize::try_from(len)) {
                if let Some(bytes) = data.get(start_usize..start_usize.saturating_add(len_usize)) {
                    let _ = PageIndex::decode(bytes, PageIndex::frames_end(start));
                }
            }
        }
    }
    let mut page = vec![0u8; 4096];
    let _ = ltx::frame::decode_frame(data, &mut page);
});
