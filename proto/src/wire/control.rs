//! The TCP control protocol (port 6783): preamble, frames, and the encrypted
//! message stream of an established connection.
//!
//! # Protocol (version 2)
//!
//! 1. **Preamble.** Each side sends 12 bytes in clear as soon as the TCP
//!    connection is up, before reading anything:
//!
//!    ```text
//!    b"meshnet\0" ‖ u8 min_version ‖ u8 max_version ‖ u8 flags ‖ u8 reserved (0)
//!    ```
//!
//!    `flags` bit 0 means "I use a password"; other flag bits and the reserved
//!    byte are sent as 0 and ignored on receipt (but bound into the handshake,
//!    see 3). Each side checks the other's:
//!    the version is `min(their max, our max)` if that is `>= max(both mins)`,
//!    else `VersionMismatch`. If the password bits differ, the side without a
//!    password fails with `PasswordRequiredByPeer` and the side with one with
//!    `PeerHasNoPassword`, so both know at once why. Version 1 (`XXpsk3`, no
//!    prologue) is no longer accepted.
//!
//! 2. **Frames** follow the preamble in both directions:
//!
//!    ```text
//!    u16 len (big-endian) ‖ u8 type ‖ payload      len = 1 + payload length, len >= 1
//!    ```
//!
//!    | type | meaning | payload limit |
//!    |------|---------|---------------|
//!    | 0 | Noise handshake message | [`MAX_HANDSHAKE_PAYLOAD`] |
//!    | 1 | Noise transport record | 65534 (what `len` allows) |
//!    | 2 | refusal: UTF-8 reason, only valid before the handshake completes | [`MAX_REFUSAL`] |
//!
//!    An unknown type, `len == 0` or a payload over its limit is an error; the
//!    limit is checked on the 3-byte header, before the payload is buffered.
//!    A responder that refuses a connection before any handshake work (rate
//!    limits, too many connections) sends its preamble and a refusal at once.
//!
//! 3. **Noise.** `Noise_XXpsk0_25519_AESGCM_SHA256` with the password-derived PSK
//!    when a password is set, else `Noise_XX_25519_AESGCM_SHA256`. The side that
//!    dialled is the initiator; static keys are the peers' identity keys. The
//!    **prologue** is the initiator's preamble followed by the responder's, as
//!    sent and received: a preamble changed in transit (a downgraded version, a
//!    flag) makes the handshake fail. The initiator sends message 1 only after it
//!    has read the responder's preamble.
//!    Message 1 (initiator) has an empty payload; message 2 (responder) carries the
//!    responder's bincode `Hello`, message 3 (initiator) the initiator's.
//!    With `psk0`, message 1 is sealed under a key mixed from the PSK, so a
//!    wrong password fails to decrypt message 1 at the responder — before any
//!    Diffie-Hellman, and before the responder's static key or `Hello` (sent in
//!    message 2 under PSK-mixed keys) leaves it. The responder then sends the
//!    refusal `"authentication failed: passwords differ"` and closes, so the
//!    initiator reports `Refused(reason)`. An initiator that cannot decrypt
//!    message 2 with a password set reports a wrong password too.
//!
//!    **Key confirmation.** Right after reading message 3 the responder sends one
//!    transport record with an empty plaintext. The initiator counts the handshake
//!    complete only once it has decrypted a transport record from the responder;
//!    until then a refusal frame is still valid. (Without this step the initiator
//!    would finish before learning that the responder refused it.)
//!
//! 4. **Transport.** Application messages are `u32 len (BE) ‖ bincode(ControlMsg)`
//!    (bincode 2 standard config), sent as a byte stream split over transport
//!    records whose plaintext is at most [`MAX_RECORD_PLAINTEXT`] bytes. A message
//!    over [`MAX_MESSAGE`] is an error, checked on its length prefix before it is
//!    buffered. Refusals and handshake frames are errors from here on.
//!
//! 5. **Data-plane keys.** From the Noise split keys `(k1, k2)` (taken before
//!    entering transport mode), HKDF-SHA256 with salt `b"meshnet-data-v1"`,
//!    IKM `k1 ‖ k2` and info `b"meshnet data i->r"` / `b"meshnet data r->i"`
//!    gives two 32-byte keys, distinct from the control channel's own keys.
//!
//! # This module
//! Owns the byte layout (preamble, frame header, message prefix) and the
//! [`ControlChannel`] that carries [`ControlMsg`]s once the handshake in
//! [`crate::handshake`] is done. No I/O: callers feed bytes read from the socket
//! and write out what `send` appends.

use serde::{Deserialize, Serialize};

use crate::gossip::{Digest, EntryVersion, MAX_SUMMARY};
use crate::topology::SignedPeerInfo;

/// The preamble's magic.
pub const MAGIC: &[u8; 8] = b"meshnet\0";
/// Preamble length.
pub const PREAMBLE_LEN: usize = 12;
/// Preamble flag: "I use a password".
pub const FLAG_PASSWORD: u8 = 0x01;
/// Frame header length: u16 len + u8 type.
pub const FRAME_HEADER_LEN: usize = 3;
/// Largest frame payload `len` can describe.
pub const MAX_FRAME_PAYLOAD: usize = u16::MAX as usize - 1;
/// Noise's AEAD tag.
pub const TAG_LEN: usize = 16;
/// Largest plaintext in one transport record: 65535 - 16 (tag) - 1 (type byte).
pub const MAX_RECORD_PLAINTEXT: usize = u16::MAX as usize - TAG_LEN - 1;
/// Largest Noise handshake message accepted (messages carry a `Hello`).
pub const MAX_HANDSHAKE_PAYLOAD: usize = 4096;
/// Largest refusal reason, in bytes.
pub const MAX_REFUSAL: usize = 256;
/// Largest application message (after its u32 length prefix).
pub const MAX_MESSAGE: usize = 4 << 20;
/// How many undecoded bytes a channel holds before refusing more: enough for the
/// largest message plus two records, as long as the caller polls after each feed.
pub const MAX_CHANNEL_BUFFER: usize = MAX_MESSAGE + 4 + 2 * (u16::MAX as usize + FRAME_HEADER_LEN) + (1 << 20);

/// What travels over an established control connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ControlMsg {
    /// Keep-alive; carries nothing.
    Heartbeat,
    /// Topology entries, each signed by its owner (all of them on a new
    /// connection, changed ones later).
    Gossip(Vec<SignedPeerInfo>),
    /// IPAM ring state, encoded by the IPAM module.
    Ipam(Vec<u8>),
    /// The sender is closing the connection, and why.
    Goodbye(String),
    /// Data-plane rekeying (see [`crate::rekey`]).
    Rekey(crate::rekey::RekeyMsg),
    /// Anti-entropy: a hash over every topology entry's version (see
    /// [`crate::gossip`]); sent only to peers with `CAP_GOSSIP_DIGEST`.
    GossipDigest(Digest),
    /// Every topology entry's name, uid and version, sorted by name, at most
    /// [`MAX_SUMMARY`] of them; the answer to a digest that differs.
    GossipSummary(Vec<EntryVersion>),
    /// meshnet DNS: signed record sets, digests and summaries (see
    /// [`crate::dns`]). Last, so the bincode tags of the others stay.
    Dns(crate::dns::DnsMsg),
    /// The sender's trusted subnets, signed (see [`crate::trusted`]); sent once
    /// per connection, only to peers with `CAP_TRUSTED`. Last, so the bincode
    /// tags of the others stay.
    Trusted(crate::trusted::SignedTrustedSubnets),
    /// A control connection between two peers that cannot dial each other,
    /// carried through a neighbour of both (see [`SpliceMsg`]); only between
    /// peers with `CAP_SPLICE`. Last, so the bincode tags of the others stay.
    Splice(SpliceMsg),
    /// meshnet DNS, IPv6: the same messages over IPv6 record sets (see
    /// [`crate::dns::DnsMsg6`]); only between peers with `CAP_DNS6`. Last, so
    /// the bincode tags of the others stay.
    Dns6(crate::dns::DnsMsg6),
}

/// Largest [`SpliceBody::Data`] chunk.
pub const MAX_SPLICE_CHUNK: usize = 16 * 1024;
/// Chunks a splice end may have sent and not had acknowledged.
pub const SPLICE_WINDOW: u32 = 16;

/// One message of a *splice*: the byte stream of a control connection between
/// `from` and `to`, carried as messages over their connections to a common
/// neighbour (the relay), for peers that cannot reach each other's TCP port
/// (both behind NAT). The relay passes a message on only from the peer it
/// names as `from`, and sets `observed` (on `Open` and `Accept`) to the UDP
/// address `from`'s authenticated heartbeats come from: a hint where to send
/// heartbeats (hole punching), believed only once heartbeats sealed with the
/// spliced connection's keys arrive from it. The bytes are a whole
/// connection (preamble, Noise handshake, messages): the relay reads nothing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpliceMsg {
    pub from: crate::PeerName,
    pub to: crate::PeerName,
    /// Chosen by the opener; with `from`/`to` names the splice.
    pub id: u64,
    pub observed: Option<std::net::SocketAddr>,
    pub body: SpliceBody,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SpliceBody {
    /// The opener asks `to` for a splice.
    Open,
    /// `to` takes it.
    Accept,
    /// Bytes of the connection, at most [`MAX_SPLICE_CHUNK`].
    Data(Vec<u8>),
    /// This many more chunks were written out: the window reopens.
    Ack(u32),
    /// The splice ends (reason, at most [`MAX_REFUSAL`] bytes).
    Close(String),
}

impl SpliceMsg {
    pub fn check(&self) -> Result<(), ControlError> {
        match &self.body {
            SpliceBody::Data(d) if d.is_empty() || d.len() > MAX_SPLICE_CHUNK => {
                Err(ControlError::Malformed("splice chunk empty or over MAX_SPLICE_CHUNK"))
            }
            SpliceBody::Ack(n) if *n == 0 || *n > SPLICE_WINDOW => Err(ControlError::Malformed("splice ack outside the window")),
            SpliceBody::Close(r) if r.len() > MAX_REFUSAL => Err(ControlError::Malformed("splice close reason too long")),
            _ if self.from == self.to => Err(ControlError::Malformed("splice to its own sender")),
            _ => Ok(()),
        }
    }
}

impl ControlMsg {
    /// Checks the bounds bincode cannot express (after decoding, before use).
    pub fn check(&self) -> Result<(), ControlError> {
        match self {
            ControlMsg::GossipSummary(v) if v.len() > MAX_SUMMARY => {
                Err(ControlError::Malformed("gossip summary over MAX_SUMMARY entries"))
            }
            ControlMsg::Dns(m) => m.check().map_err(|_| ControlError::Malformed("DNS message over its bounds")),
            ControlMsg::Dns6(m) => m.check().map_err(|_| ControlError::Malformed("DNS message over its bounds")),
            ControlMsg::Trusted(t) => t.check().map_err(|_| ControlError::Malformed("trusted-subnets record over its bounds")),
            ControlMsg::Splice(m) => m.check(),
            _ => Ok(()),
        }
    }
}

/// The opening 12 bytes each side sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preamble {
    pub min_version: u8,
    pub max_version: u8,
    pub password: bool,
}

/// Why a preamble could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a meshnet peer: bad preamble magic")]
pub struct BadMagic;

impl Preamble {
    pub fn emit(&self) -> [u8; PREAMBLE_LEN] {
        let mut b = [0u8; PREAMBLE_LEN];
        b[..8].copy_from_slice(MAGIC);
        b[8] = self.min_version;
        b[9] = self.max_version;
        b[10] = if self.password { FLAG_PASSWORD } else { 0 };
        b
    }

    pub fn parse(b: &[u8; PREAMBLE_LEN]) -> Result<Preamble, BadMagic> {
        if &b[..8] != MAGIC {
            return Err(BadMagic);
        }
        Ok(Preamble { min_version: b[8], max_version: b[9], password: b[10] & FLAG_PASSWORD != 0 })
    }
}

/// Frame types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameType {
    Handshake = 0,
    Transport = 1,
    Refusal = 2,
}

impl FrameType {
    fn from_byte(b: u8) -> Option<FrameType> {
        match b {
            0 => Some(FrameType::Handshake),
            1 => Some(FrameType::Transport),
            2 => Some(FrameType::Refusal),
            _ => None,
        }
    }

    /// Largest payload accepted for this type.
    pub fn max_payload(self) -> usize {
        match self {
            FrameType::Handshake => MAX_HANDSHAKE_PAYLOAD,
            FrameType::Transport => MAX_FRAME_PAYLOAD,
            FrameType::Refusal => MAX_REFUSAL,
        }
    }
}

/// Why a frame header was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    #[error("frame with length 0")]
    Empty,
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("{kind:?} frame of {len} bytes is over its limit of {max}")]
    TooLarge { kind: FrameType, len: usize, max: usize },
}

/// One frame, borrowed from the input buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub kind: FrameType,
    pub payload: &'a [u8],
}

impl<'a> Frame<'a> {
    /// Checks the frame at the front of `buf` (mini-redis `check` + `parse` in one):
    /// `Ok(None)` if more bytes are needed, else the frame and how many bytes it
    /// used. The header is validated as soon as it is complete, so an oversize or
    /// unknown frame fails before its payload arrives.
    pub fn parse(buf: &'a [u8]) -> Result<Option<(Frame<'a>, usize)>, FrameError> {
        let [hi, lo, ty, ..] = *buf else { return Ok(None) };
        let len = u16::from_be_bytes([hi, lo]) as usize;
        if len == 0 {
            return Err(FrameError::Empty);
        }
        let kind = FrameType::from_byte(ty).ok_or(FrameError::UnknownType(ty))?;
        let payload_len = len - 1;
        if payload_len > kind.max_payload() {
            return Err(FrameError::TooLarge { kind, len: payload_len, max: kind.max_payload() });
        }
        let total = 2 + len;
        match buf.get(FRAME_HEADER_LEN..total) {
            Some(payload) => Ok(Some((Frame { kind, payload }, total))),
            None => Ok(None),
        }
    }

    /// Appends one frame to `out`. The payload must fit `kind`'s limit (callers
    /// in this crate guarantee it); an oversize payload is refused, not truncated.
    pub fn emit(kind: FrameType, payload: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
        if payload.len() > kind.max_payload() {
            return Err(FrameError::TooLarge { kind, len: payload.len(), max: kind.max_payload() });
        }
        out.extend_from_slice(&((payload.len() + 1) as u16).to_be_bytes());
        out.push(kind as u8);
        out.extend_from_slice(payload);
        Ok(())
    }
}

/// A refusal reason as received: invalid UTF-8 replaced, control characters
/// (which could forge log lines) shown as `?`.
pub fn sanitize_reason(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload).chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

/// Why the control channel failed. After any error the channel is unusable:
/// close the connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    #[error("malformed frame: {0}")]
    Frame(#[from] FrameError),
    #[error("protocol violation: {0}")]
    Malformed(&'static str),
    #[error("peer sent a refusal after the handshake completed: {0:?}")]
    UnexpectedRefusal(String),
    #[error("message of {len} bytes is over the limit of {MAX_MESSAGE}")]
    MessageTooLarge { len: usize },
    #[error("transport record failed to decrypt")]
    Decrypt,
    #[error("message did not decode: {0}")]
    Decode(String),
    #[error("message did not encode: {0}")]
    Encode(String),
    #[error("more than {MAX_CHANNEL_BUFFER} bytes buffered: poll_message after every feed")]
    BufferFull,
    #[error("noise: {0}")]
    Noise(String),
    #[error("channel already failed")]
    Poisoned,
}

/// bincode's decode limit counts the in-memory size of what it decodes (a u64 that
/// took one varint byte on the wire counts 8), so it is set to 8x the wire bound:
/// every message within [`MAX_MESSAGE`] on the wire decodes, and a forged length
/// still cannot make the decoder reserve more than this.
const DECODE_LIMIT: usize = 8 * MAX_MESSAGE;

fn wire_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

/// Encodes one message body (without the length prefix).
pub fn encode_message(msg: &ControlMsg) -> Result<Vec<u8>, ControlError> {
    let body = bincode::serde::encode_to_vec(msg, wire_config()).map_err(|e| ControlError::Encode(e.to_string()))?;
    if body.len() > MAX_MESSAGE {
        return Err(ControlError::MessageTooLarge { len: body.len() });
    }
    Ok(body)
}

/// Decodes one message body; every byte must be used.
pub fn decode_message(body: &[u8]) -> Result<ControlMsg, ControlError> {
    if body.len() > MAX_MESSAGE {
        return Err(ControlError::MessageTooLarge { len: body.len() });
    }
    let (msg, used): (ControlMsg, usize) =
        bincode::serde::decode_from_slice(body, wire_config()).map_err(|e| ControlError::Decode(e.to_string()))?;
    if used != body.len() {
        return Err(ControlError::Malformed("trailing bytes after message"));
    }
    msg.check()?;
    Ok(msg)
}

/// Decodes a bare bincode `Vec<SignedPeerInfo>` (the body of a `Gossip` without
/// its enum tag) under the same limit; for tools and fuzzing.
pub fn decode_gossip(bytes: &[u8]) -> Result<Vec<SignedPeerInfo>, ControlError> {
    let (peers, _) =
        bincode::serde::decode_from_slice(bytes, wire_config()).map_err(|e| ControlError::Decode(e.to_string()))?;
    Ok(peers)
}

/// Largest encoded size [`split_gossip`] aims for per message: well under
/// [`MAX_MESSAGE`], so gossip of any topology the bounds allow fits, and one
/// message never holds a connection's queue for long.
pub const GOSSIP_CHUNK: usize = 256 << 10;

/// Splits topology entries into `Gossip` messages of at most about `max` encoded
/// bytes each, keeping their order (an entry larger than `max` on its own, which
/// the topology bounds keep under [`MAX_MESSAGE`], gets a message to itself). No
/// entries: no messages.
pub fn split_gossip(infos: Vec<SignedPeerInfo>, max: usize) -> Vec<ControlMsg> {
    // Enum tag and vector length: at most 5 + 9 bytes.
    const OVERHEAD: usize = 16;
    let mut out = Vec::new();
    let mut chunk = Vec::new();
    let mut size = OVERHEAD;
    for info in infos {
        let len = bincode::serde::encode_to_vec(&info, wire_config()).map_or(usize::MAX / 2, |b| b.len());
        if !chunk.is_empty() && size + len > max {
            out.push(ControlMsg::Gossip(std::mem::take(&mut chunk)));
            size = OVERHEAD;
        }
        size += len;
        chunk.push(info);
    }
    if !chunk.is_empty() {
        out.push(ControlMsg::Gossip(chunk));
    }
    out
}

/// The encrypted message stream of an established control connection.
///
/// Drive it with [`feed`](Self::feed) (bytes read from the socket), then
/// [`poll_message`](Self::poll_message) until it returns `Ok(None)`. Records are
/// decrypted lazily, only as far as the next complete message, so the undecoded
/// input stays under [`MAX_CHANNEL_BUFFER`] for a caller that polls after every feed.
pub struct ControlChannel {
    transport: snow::TransportState,
    /// Ciphertext frames not yet decrypted; `input[input_pos..]` is live.
    input: Vec<u8>,
    input_pos: usize,
    /// Decrypted stream bytes; `stream[stream_pos..]` is live.
    stream: Vec<u8>,
    stream_pos: usize,
    failed: bool,
}

/// Capacity an emptied buffer keeps (see [`ControlChannel`]): records are
/// sealed and opened in place, and a buffer that grew for a large message gives
/// the rest back once it is consumed, so a router with a hundred connections
/// does not hold a hundred copies of its largest gossip.
const KEEP_CAPACITY: usize = 4 * 1024;

impl std::fmt::Debug for ControlChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlChannel")
            .field("buffered_input", &(self.input.len() - self.input_pos))
            .field("buffered_plaintext", &(self.stream.len() - self.stream_pos))
            .field("failed", &self.failed)
            .finish()
    }
}

impl ControlChannel {
    /// Wraps a finished Noise session. `input` holds bytes that arrived after the
    /// handshake's last frame; `stream` plaintext already decrypted.
    pub(crate) fn new(transport: snow::TransportState, input: Vec<u8>, stream: Vec<u8>) -> Self {
        ControlChannel {
            transport,
            input,
            input_pos: 0,
            stream,
            stream_pos: 0,
            failed: false,
        }
    }

    /// Test support: forget a failure and expect the peer's next record to carry
    /// nonce `next_nonce`, so randomized tests can reuse one Noise session.
    #[cfg(test)]
    pub(crate) fn resync_for_test(&mut self, next_nonce: u64) {
        self.transport.set_receiving_nonce(next_nonce);
        self.input.clear();
        self.input_pos = 0;
        self.stream.clear();
        self.stream_pos = 0;
        self.failed = false;
    }

    #[cfg(test)]
    pub(crate) fn sending_nonce_for_test(&self) -> u64 {
        self.transport.sending_nonce()
    }

    /// Encrypts `msg` and appends its frames to `out`.
    pub fn send(&mut self, msg: &ControlMsg, out: &mut Vec<u8>) -> Result<(), ControlError> {
        let body = encode_message(msg)?;
        let mut stream = Vec::with_capacity(4 + body.len());
        stream.extend_from_slice(&(body.len() as u32).to_be_bytes());
        stream.extend_from_slice(&body);
        self.send_stream_bytes(&stream, out)
    }

    /// Encrypts raw stream bytes (no message framing) into records. For building
    /// test and fuzz inputs; [`send`](Self::send) is the way to send messages.
    #[doc(hidden)]
    pub fn send_stream_bytes(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), ControlError> {
        if self.failed {
            return Err(ControlError::Poisoned);
        }
        for chunk in bytes.chunks(MAX_RECORD_PLAINTEXT) {
            self.seal_record(chunk, out)?;
        }
        Ok(())
    }

    /// Appends one transport record (an empty plaintext is allowed), sealed in
    /// place at the end of `out`.
    pub(crate) fn seal_record(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), ControlError> {
        if plaintext.len() > MAX_RECORD_PLAINTEXT {
            let (kind, len) = (FrameType::Transport, plaintext.len() + TAG_LEN);
            return Err(FrameError::TooLarge { kind, len, max: kind.max_payload() }.into());
        }
        let start = out.len();
        let body = start + FRAME_HEADER_LEN;
        out.resize(body + plaintext.len() + TAG_LEN, 0);
        let n = match self.transport.write_message(plaintext, &mut out[body..]) {
            Ok(n) => n,
            Err(e) => {
                out.truncate(start);
                self.failed = true;
                return Err(ControlError::Noise(e.to_string()));
            }
        };
        out.truncate(body + n);
        out[start..start + 2].copy_from_slice(&((n + 1) as u16).to_be_bytes());
        out[start + 2] = FrameType::Transport as u8;
        Ok(())
    }

    /// Buffers bytes read from the socket. Poll messages after every call.
    pub fn feed(&mut self, input: &[u8]) -> Result<(), ControlError> {
        if self.failed {
            return Err(ControlError::Poisoned);
        }
        let held = self.input.len() - self.input_pos + self.stream.len() - self.stream_pos;
        if held + input.len() > MAX_CHANNEL_BUFFER {
            self.failed = true;
            return Err(ControlError::BufferFull);
        }
        if self.input_pos > 0 {
            self.input.drain(..self.input_pos);
            self.input_pos = 0;
        }
        self.input.extend_from_slice(input);
        Ok(())
    }

    /// The next complete message, if any.
    pub fn poll_message(&mut self) -> Result<Option<ControlMsg>, ControlError> {
        if self.failed {
            return Err(ControlError::Poisoned);
        }
        let result = self.poll_inner();
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn poll_inner(&mut self) -> Result<Option<ControlMsg>, ControlError> {
        loop {
            if let Some(msg) = self.take_message()? {
                return Ok(Some(msg));
            }
            if !self.open_record()? {
                return Ok(None);
            }
        }
    }

    /// Takes one complete message off the plaintext stream, checking its length
    /// prefix as soon as it is there.
    fn take_message(&mut self) -> Result<Option<ControlMsg>, ControlError> {
        let live = &self.stream[self.stream_pos..];
        let [a, b, c, d, ..] = *live else { return Ok(None) };
        let len = u32::from_be_bytes([a, b, c, d]) as usize;
        if len > MAX_MESSAGE {
            return Err(ControlError::MessageTooLarge { len });
        }
        let Some(body) = live.get(4..4 + len) else { return Ok(None) };
        let msg = decode_message(body)?;
        self.stream_pos += 4 + len;
        if self.stream_pos == self.stream.len() {
            self.stream.clear();
            self.stream.shrink_to(KEEP_CAPACITY);
            self.stream_pos = 0;
        } else if self.stream_pos > self.stream.len() / 2 {
            self.stream.drain(..self.stream_pos);
            self.stream_pos = 0;
        }
        Ok(Some(msg))
    }

    /// Decrypts the next frame onto the plaintext stream; false if none is complete.
    fn open_record(&mut self) -> Result<bool, ControlError> {
        let Some((frame, used)) = Frame::parse(&self.input[self.input_pos..])? else { return Ok(false) };
        match frame.kind {
            FrameType::Transport => {
                // Opened in place at the end of the plaintext stream.
                let start = self.stream.len();
                self.stream.resize(start + frame.payload.len(), 0);
                match self.transport.read_message(frame.payload, &mut self.stream[start..]) {
                    Ok(n) => self.stream.truncate(start + n),
                    Err(e) => {
                        self.stream.truncate(start);
                        return Err(match e {
                            snow::Error::Decrypt => ControlError::Decrypt,
                            other => ControlError::Noise(other.to_string()),
                        });
                    }
                }
            }
            FrameType::Refusal => return Err(ControlError::UnexpectedRefusal(sanitize_reason(frame.payload))),
            FrameType::Handshake => {
                return Err(ControlError::Malformed("handshake frame after the handshake completed"))
            }
        }
        self.input_pos += used;
        if self.input_pos == self.input.len() {
            self.input.clear();
            self.input.shrink_to(KEEP_CAPACITY);
            self.input_pos = 0;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preamble_round_trip_and_magic() {
        let p = Preamble { min_version: 1, max_version: 3, password: true };
        let b = p.emit();
        assert_eq!(&b[..8], b"meshnet\0");
        assert_eq!(b[8..], [1, 3, 1, 0]);
        assert_eq!(Preamble::parse(&b), Ok(p));
        let mut other = b;
        other[11] = 0xff;
        other[10] = 0xfe;
        assert_eq!(Preamble::parse(&other), Ok(Preamble { password: false, ..p }), "unknown bits ignored");
        let mut bad = b;
        bad[0] = b'M';
        assert_eq!(Preamble::parse(&bad), Err(BadMagic));
    }

    #[test]
    fn frame_parse_checks_the_header_before_the_payload() {
        assert_eq!(Frame::parse(&[]), Ok(None));
        assert_eq!(Frame::parse(&[0, 5]), Ok(None));
        assert_eq!(Frame::parse(&[0, 5, 1, 9]), Ok(None), "truncated payload waits");
        assert_eq!(Frame::parse(&[0, 0, 1]), Err(FrameError::Empty));
        assert_eq!(Frame::parse(&[0, 1, 7]), Err(FrameError::UnknownType(7)));
        assert!(matches!(Frame::parse(&[0x10, 2, 0]), Err(FrameError::TooLarge { kind: FrameType::Handshake, .. })));
        assert!(matches!(Frame::parse(&[1, 2, 2]), Err(FrameError::TooLarge { kind: FrameType::Refusal, .. })));
        assert_eq!(Frame::parse(&[0xff, 0xff, 1]), Ok(None), "largest transport record is fine");
        let (f, used) = Frame::parse(&[0, 3, 2, b'n', b'o', 0xaa]).unwrap().unwrap();
        assert_eq!((f.kind, f.payload, used), (FrameType::Refusal, &b"no"[..], 5));
        assert_eq!(Frame::parse(&[0, 1, 1]).unwrap().unwrap().0.payload, b"");
    }

    #[test]
    fn frame_emit_round_trips_and_refuses_oversize() {
        let mut out = Vec::new();
        Frame::emit(FrameType::Transport, &[1, 2, 3], &mut out).unwrap();
        assert_eq!(out, [0, 4, 1, 1, 2, 3]);
        assert!(Frame::emit(FrameType::Refusal, &[b'x'; MAX_REFUSAL + 1], &mut out).is_err());
        assert!(Frame::emit(FrameType::Transport, &vec![0; MAX_FRAME_PAYLOAD + 1], &mut out).is_err());
        assert_eq!(out.len(), 6);
    }

    #[test]
    fn reasons_are_sanitised() {
        assert_eq!(sanitize_reason(b"bad\npass\xffword"), "bad?pass\u{fffd}word");
    }

    #[test]
    fn message_codec_rejects_trailing_bytes_and_garbage() {
        let body = encode_message(&ControlMsg::Goodbye("bye".into())).unwrap();
        assert_eq!(decode_message(&body).unwrap(), ControlMsg::Goodbye("bye".into()));
        let mut longer = body.clone();
        longer.push(0);
        assert!(matches!(decode_message(&longer), Err(ControlError::Malformed(_))));
        assert!(matches!(decode_message(&[9]), Err(ControlError::Decode(_))));
        // A Vec claiming 2^60 elements must fail on the limit, not allocate.
        assert!(matches!(decode_message(&[1, 0xff, 0, 0, 0, 0, 0, 0, 0, 0x10]), Err(ControlError::Decode(_))));
        assert!(decode_gossip(&[0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
    }

    #[test]
    fn gossip_digests_and_summaries_round_trip_within_bounds() {
        use crate::gossip::{Digest, EntryVersion};
        use crate::PeerName;
        let d = ControlMsg::GossipDigest(Digest { peers: 3, hash: [9; 16] });
        assert_eq!(decode_message(&encode_message(&d).unwrap()).unwrap(), d);
        let e = EntryVersion { name: PeerName(0x1234_5678_9abc), uid: u64::MAX, version: 7 };
        let s = ControlMsg::GossipSummary(vec![e; MAX_SUMMARY]);
        let body = encode_message(&s).unwrap();
        assert!(body.len() < MAX_MESSAGE / 8, "the largest summary is small: {}", body.len());
        assert_eq!(decode_message(&body).unwrap(), s);
        let over = encode_message(&ControlMsg::GossipSummary(vec![e; MAX_SUMMARY + 1])).unwrap();
        assert!(matches!(decode_message(&over), Err(ControlError::Malformed(_))));
    }

    #[test]
    fn splice_messages_roundtrip_and_their_bounds_are_checked() {
        use crate::PeerName;
        let m = |body| ControlMsg::Splice(SpliceMsg { from: PeerName(1), to: PeerName(2), id: 7, observed: Some("10.0.0.1:6783".parse().unwrap()), body });
        for body in [SpliceBody::Open, SpliceBody::Accept, SpliceBody::Data(vec![1; MAX_SPLICE_CHUNK]), SpliceBody::Ack(SPLICE_WINDOW), SpliceBody::Close("bye".into())] {
            let bytes = encode_message(&m(body.clone())).unwrap();
            assert_eq!(bytes[0], 9, "the tenth variant: the fuzz target splice_msg relies on it");
            assert_eq!(decode_message(&bytes).unwrap(), m(body));
        }
        for bad in [SpliceBody::Data(vec![]), SpliceBody::Data(vec![0; MAX_SPLICE_CHUNK + 1]), SpliceBody::Ack(0), SpliceBody::Ack(SPLICE_WINDOW + 1), SpliceBody::Close("x".repeat(MAX_REFUSAL + 1))] {
            let bytes = encode_message(&m(bad.clone())).unwrap();
            assert!(matches!(decode_message(&bytes), Err(ControlError::Malformed(_))), "{bad:?}");
        }
        let own = ControlMsg::Splice(SpliceMsg { from: PeerName(1), to: PeerName(1), id: 1, observed: None, body: SpliceBody::Open });
        assert!(matches!(decode_message(&encode_message(&own).unwrap()), Err(ControlError::Malformed(_))));
    }
}
