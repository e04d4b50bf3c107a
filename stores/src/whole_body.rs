//! A GET's body must be as long as the store announced: a connection that ends early without
//! an error (a proxy, an S3-compatible server that drops the tail) would otherwise hand a
//! reader fewer bytes than it asked for, silently. A short body becomes a transient error
//! here, so the reader's retry fetches it again.

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::{self, BoxStream};
use object_store::{GetResult, GetResultPayload, Result};

/// `result` with its body stream checked: it ends with an error if it carries fewer (or more)
/// bytes than its range says. Local files are read by their range and need no check.
pub fn checked(result: Result<GetResult>) -> Result<GetResult> {
    let mut got = result?;
    let GetResultPayload::Stream(body) = got.payload else {
        return Ok(got);
    };
    let expected = got.range.end.saturating_sub(got.range.start);
    let location = got.meta.location.to_string();
    got.payload = GetResultPayload::Stream(counted(body, expected, location));
    Ok(got)
}

fn counted(
    body: BoxStream<'static, Result<Bytes>>,
    expected: u64,
    location: String,
) -> BoxStream<'static, Result<Bytes>> {
    // (body, bytes seen, the location for an error; `None` once the stream has ended)
    let state = Some((body, 0u64, location));
    stream::unfold(state, move |state| async move {
        let (mut body, seen, location) = state?;
        match body.next().await {
            Some(Ok(bytes)) => {
                let seen = seen + bytes.len() as u64;
                if seen > expected {
                    return Some((Err(wrong_length(&location, seen, expected)), None));
                }
                Some((Ok(bytes), Some((body, seen, location))))
            }
            Some(Err(e)) => Some((Err(e), None)),
            None if seen < expected => Some((Err(wrong_length(&location, seen, expected)), None)),
            None => None,
        }
    })
    .boxed()
}

fn wrong_length(location: &str, seen: u64, expected: u64) -> object_store::Error {
    object_store::Error::Generic {
        store: "body check",
        source: format!("{location}: the body ended after {seen} of {expected} bytes").into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::path::Path;
    use object_store::{Attributes, ObjectMeta};

    fn answer(parts: Vec<&'static [u8]>, announced: u64) -> Result<GetResult> {
        let body = stream::iter(parts.into_iter().map(|p| Ok(Bytes::from_static(p)))).boxed();
        Ok(GetResult {
            payload: GetResultPayload::Stream(body),
            meta: ObjectMeta {
                location: Path::from("a"),
                last_modified: chrono::Utc::now(),
                size: announced,
                e_tag: None,
                version: None,
            },
            range: 0..announced,
            attributes: Attributes::default(),
            extensions: Default::default(),
        })
    }

    #[tokio::test]
    async fn a_whole_body_passes() -> Result<()> {
        let body = checked(answer(vec![b"abc", b"de"], 5))?.bytes().await?;
        assert_eq!(&body[..], b"abcde");
        Ok(())
    }

    #[tokio::test]
    async fn a_short_or_long_body_is_an_error_that_says_so() -> Result<()> {
        let short = checked(answer(vec![b"abc"], 5))?.bytes().await;
        let e = short.expect_err("short body accepted");
        assert!(e.to_string().contains("after 3 of 5 bytes"), "{e}");
        assert!(crate::retry::transient(&e), "worth retrying");
        let long = checked(answer(vec![b"abcdef"], 5))?.bytes().await;
        assert!(long.is_err(), "long body accepted");
        Ok(())
    }
}
