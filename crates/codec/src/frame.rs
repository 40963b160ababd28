//! Frames: cutting them off an input buffer, and writing frame envelopes.

use crate::error::AmqpError;
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The protocol header a client sends first (and the server answers with on a mismatch).
pub const PROTOCOL_HEADER: [u8; 8] = *b"AMQP\x00\x00\x09\x01";
/// Frame type of a method frame.
pub const FRAME_METHOD: u8 = 1;
/// Frame type of a content header frame.
pub const FRAME_HEADER: u8 = 2;
/// Frame type of a content body frame.
pub const FRAME_BODY: u8 = 3;
/// Frame type of a heartbeat frame.
pub const FRAME_HEARTBEAT: u8 = 8;
/// The octet that ends every frame.
pub const FRAME_END: u8 = 0xCE;
/// Bytes a frame adds around its payload: the 7-byte header and the frame-end octet.
pub const FRAME_OVERHEAD: usize = 8;

const HEADER_LEN: usize = 7;

/// One frame cut from the input; `payload` excludes the 7-byte header and frame-end octet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// Frame type ([`FRAME_METHOD`], [`FRAME_HEADER`], [`FRAME_BODY`] or [`FRAME_HEARTBEAT`]).
    pub kind: u8,
    /// Channel number.
    pub channel: u16,
    /// The payload, a zero-copy slice of the input buffer.
    pub payload: Bytes,
}

/// Cuts one frame off the front of `buf`.
///
/// `Ok(None)` means the frame is incomplete: nothing is consumed, read more and call
/// again. The announced size is checked against `frame_max` (the whole frame including
/// its 8 bytes of overhead, as AMQP defines it; 0 = no limit) as soon as the 7-byte
/// header is in, so a frame claiming 4 GiB fails at once instead of being buffered.
/// Oversize frames, a bad frame-end octet and unknown frame types are 501 FRAME_ERROR
/// (as RabbitMQ). On error the buffer is left as it was; the connection must close.
///
/// ```
/// use bytes::BytesMut;
/// use rill_codec::{encode_heartbeat, split_frame, FRAME_HEARTBEAT};
/// let mut buf = BytesMut::new();
/// encode_heartbeat(&mut buf);
/// let mut partial = BytesMut::from(&buf[..5]);
/// assert_eq!(split_frame(&mut partial, 131072).unwrap(), None);
/// let frame = split_frame(&mut buf, 131072).unwrap().unwrap();
/// assert_eq!((frame.kind, frame.channel, frame.payload.len()), (FRAME_HEARTBEAT, 0, 0));
/// assert!(buf.is_empty());
/// ```
pub fn split_frame(buf: &mut BytesMut, frame_max: u32) -> Result<Option<RawFrame>, AmqpError> {
    let Some(&kind) = buf.first() else {
        return Ok(None);
    };
    if !matches!(
        kind,
        FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
    ) {
        return Err(AmqpError::frame(format_args!("unknown frame type {kind}")));
    }
    let Some(Ok([_, c0, c1, s0, s1, s2, s3])) = buf.get(..HEADER_LEN).map(<[u8; 7]>::try_from)
    else {
        return Ok(None);
    };
    let channel = u16::from_be_bytes([c0, c1]);
    let size = u32::from_be_bytes([s0, s1, s2, s3]);
    if frame_max != 0 && u64::from(size) + FRAME_OVERHEAD as u64 > u64::from(frame_max) {
        return Err(AmqpError::frame(format_args!(
            "type {kind}, all octets = {size}: frame size {} larger than negotiated maximum {frame_max}",
            u64::from(size) + FRAME_OVERHEAD as u64
        )));
    }
    // u32 always fits usize on the 32/64-bit targets we build for; saturate otherwise.
    let size = usize::try_from(size).unwrap_or(usize::MAX);
    let total = size.saturating_add(FRAME_OVERHEAD);
    let Some(&end) = buf.get(total - 1) else {
        return Ok(None);
    };
    if end != FRAME_END {
        return Err(AmqpError::frame(format_args!(
            "bad frame end octet {end:#04x} (expected 0xce)"
        )));
    }
    // Trim the envelope on the BytesMut before freezing: that costs no reference-count
    // traffic, unlike slicing the frozen Bytes.
    let mut payload = buf.split_to(total);
    payload.advance(HEADER_LEN);
    payload.truncate(size);
    Ok(Some(RawFrame {
        kind,
        channel,
        payload: payload.freeze(),
    }))
}

/// Appends a heartbeat frame (channel 0, empty payload).
pub fn encode_heartbeat(out: &mut BytesMut) {
    out.put_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
}

/// Writes a frame header announcing `size` payload bytes. The caller writes exactly
/// `size` bytes and then [`FRAME_END`].
pub(crate) fn put_frame_header(out: &mut BytesMut, kind: u8, channel: u16, size: u32) {
    out.put_u8(kind);
    out.put_u16(channel);
    out.put_u32(size);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;
    use crate::ReplyCode;

    fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![kind];
        v.extend_from_slice(&channel.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v.push(FRAME_END);
        v
    }

    #[test]
    fn incomplete_at_every_cut_point() {
        let mut whole = frame(FRAME_METHOD, 7, b"0123456789");
        whole.extend(frame(FRAME_BODY, 7, b"xyz"));
        let first_len = 18;
        for cut in 0..whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            let got = split_frame(&mut buf, 131072).unwrap();
            if cut < first_len {
                assert_eq!(got, None, "cut {cut}");
                assert_eq!(buf.len(), cut, "nothing consumed at cut {cut}");
            } else {
                let f = got.unwrap();
                assert_eq!(
                    (f.kind, f.channel, &f.payload[..]),
                    (FRAME_METHOD, 7, &b"0123456789"[..])
                );
                assert_eq!(split_frame(&mut buf, 131072).unwrap(), None, "cut {cut}");
            }
        }
        let mut buf = BytesMut::from(&whole[..]);
        assert_eq!(
            split_frame(&mut buf, 0).unwrap().unwrap().payload,
            &b"0123456789"[..]
        );
        let f = split_frame(&mut buf, 0).unwrap().unwrap();
        assert_eq!((f.kind, &f.payload[..]), (FRAME_BODY, &b"xyz"[..]));
        assert!(buf.is_empty());
    }

    #[test]
    fn four_gib_claim_fails_immediately() {
        let mut buf = BytesMut::from(&[FRAME_BODY, 0, 1, 0xff, 0xff, 0xff, 0xff][..]);
        let err = split_frame(&mut buf, 131072).unwrap_err();
        assert_eq!(err.code, ReplyCode::FrameError);
        assert_eq!(buf.len(), 7);
    }

    #[test]
    fn frame_max_is_inclusive_of_overhead() {
        let payload = vec![0u8; 4096 - FRAME_OVERHEAD];
        let mut buf = BytesMut::from(&frame(FRAME_BODY, 1, &payload)[..]);
        assert!(split_frame(&mut buf, 4096).unwrap().is_some());
        let payload = vec![0u8; 4096 - FRAME_OVERHEAD + 1];
        let mut buf = BytesMut::from(&frame(FRAME_BODY, 1, &payload)[..]);
        assert_eq!(
            split_frame(&mut buf, 4096).unwrap_err().code,
            ReplyCode::FrameError
        );
        let mut buf = BytesMut::from(&frame(FRAME_BODY, 1, &payload)[..]);
        assert!(split_frame(&mut buf, 0).unwrap().is_some());
    }

    #[test]
    fn bad_frame_end_and_unknown_type() {
        let mut bad = frame(FRAME_METHOD, 1, b"abc");
        *bad.last_mut().unwrap() = 0;
        let mut buf = BytesMut::from(&bad[..]);
        assert_eq!(
            split_frame(&mut buf, 131072).unwrap_err().code,
            ReplyCode::FrameError
        );
        for kind in [0u8, 4, 9, b'A', 0xff] {
            let mut buf = BytesMut::from(&frame(kind, 0, b"")[..]);
            assert_eq!(
                split_frame(&mut buf, 131072).unwrap_err().code,
                ReplyCode::FrameError
            );
        }
    }

    #[test]
    fn parses_what_amq_protocol_generates() {
        use amq_protocol::frame::{gen_frame, AMQPFrame, WriteContext};
        let frames = [
            AMQPFrame::Heartbeat,
            AMQPFrame::Body(3, b"hello".to_vec()),
            AMQPFrame::Method(
                2,
                amq_protocol::protocol::AMQPClass::Tx(
                    amq_protocol::protocol::tx::AMQPMethod::Select(
                        amq_protocol::protocol::tx::Select {},
                    ),
                ),
            ),
        ];
        for f in &frames {
            let (bytes, _) = gen_frame(f)(WriteContext::from(Vec::new()))
                .unwrap()
                .into_inner();
            let mut buf = BytesMut::from(&bytes[..]);
            let raw = split_frame(&mut buf, 131072).unwrap().unwrap();
            assert!(buf.is_empty());
            assert_eq!(raw.channel, f.channel_id());
            assert_eq!(raw.payload.len() + FRAME_OVERHEAD, bytes.len());
        }
    }
}
