//! Clients that name the socket as the HTTP/2 `:authority`.
//!
//! gRPC over a unix socket has no host, and clients fill `:authority` their own
//! way: `localhost` (grpc-go dialling `unix://...`, as today's kubelet and sidecars
//! do), or the socket's path (kubelets before Kubernetes 1.26, `csc`, csi-sanity
//! before v5, any grpc-go client dialling a bare path). h2, under tonic, takes a
//! path for a malformed authority and resets every such call with PROTOCOL_ERROR,
//! so those clients could not use the driver at all. The driver never reads the
//! authority, so it is mended on the way in.
//!
//! A connection's first header block decides. Its authority is valid in the usual
//! case, and the connection is then passed through untouched from there on. If it
//! is not, every header block of the connection is decoded (HPACK's table is
//! per connection, so none may be skipped) and sent on as plain literals with
//! `:authority: localhost`; plain literals leave the server's table empty, so what
//! the client's table holds never matters to it.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame a server accepts until it says otherwise (RFC 9113 6.5.2),
/// which tonic's does not.
const MAX_FRAME: usize = 16_384;
/// A frame or header block larger than this is not buffered: the connection is
/// passed through as it is, for h2 to judge.
const MAX_BUFFERED: usize = 1 << 20;
/// What a mended authority says.
const LOCALHOST: &[u8] = b"localhost";

/// The state of one connection's client-to-server bytes.
pub struct Repair {
    stage: Stage,
    /// Bytes read and not yet passed on: less than a whole frame.
    input: Vec<u8>,
    /// The client's HPACK table, once the connection is mended.
    table: Table,
    /// A header block whose CONTINUATION frames are still to come.
    pending: Option<Pending>,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Stage {
    Preface,
    /// Reading frames; `mend` once the first block's authority was refused.
    Frames {
        mend: bool,
    },
    /// Nothing to mend on this connection.
    Through,
}

struct Pending {
    stream: u32,
    end_stream: bool,
    block: Vec<u8>,
    /// The frames as they came, to pass on if the block is left alone.
    frames: Vec<u8>,
}

impl Default for Repair {
    fn default() -> Self {
        Repair {
            stage: Stage::Preface,
            input: Vec::new(),
            table: Table::default(),
            pending: None,
        }
    }
}

impl Repair {
    /// Whether the rest of the connection passes untouched.
    pub fn is_through(&self) -> bool {
        self.stage == Stage::Through
    }

    /// Takes bytes the client sent and appends what the server is to read.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        if self.is_through() {
            out.extend_from_slice(bytes);
            return;
        }
        self.input.extend_from_slice(bytes);
        while self.step(out) {}
        if self.is_through() {
            if let Some(p) = self.pending.take() {
                out.extend_from_slice(&p.frames);
            }
            out.append(&mut self.input);
        }
    }

    /// At the end of the client's bytes: what is left goes on as it came.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if let Some(p) = self.pending.take() {
            out.extend_from_slice(&p.frames);
        }
        out.append(&mut self.input);
        self.stage = Stage::Through;
    }

    /// Handles one preface or frame; false when more bytes are needed.
    fn step(&mut self, out: &mut Vec<u8>) -> bool {
        let mend = match self.stage {
            Stage::Through => return false,
            Stage::Preface => {
                if self.input.len() < PREFACE.len() {
                    return false;
                }
                self.stage = if self.input.starts_with(PREFACE) {
                    out.extend(self.input.drain(..PREFACE.len()));
                    Stage::Frames { mend: false }
                } else {
                    Stage::Through
                };
                return true;
            }
            Stage::Frames { mend } => mend,
        };
        if self.input.len() < 9 {
            return false;
        }
        let len = u32::from_be_bytes([0, self.input[0], self.input[1], self.input[2]]) as usize;
        let (kind, flags) = (self.input[3], self.input[4]);
        let stream = u32::from_be_bytes(self.input[5..9].try_into().unwrap()) & 0x7fff_ffff;
        let buffered = self.pending.as_ref().map_or(0, |p| p.frames.len());
        if 9 + len + buffered > MAX_BUFFERED {
            self.stage = Stage::Through;
            return false;
        }
        if self.input.len() < 9 + len {
            return false;
        }
        let frame: Vec<u8> = self.input.drain(..9 + len).collect();
        match (kind, self.pending.take()) {
            (HEADERS, None) => {
                let Some(fragment) = fragment(&frame[9..], flags) else {
                    self.stage = Stage::Through;
                    out.extend_from_slice(&frame);
                    return false;
                };
                let p = Pending {
                    stream,
                    end_stream: flags & END_STREAM != 0,
                    block: fragment.to_vec(),
                    frames: frame,
                };
                self.header_block(p, flags, mend, out);
            }
            (CONTINUATION, Some(mut p)) => {
                p.block.extend_from_slice(&frame[9..]);
                p.frames.extend_from_slice(&frame);
                self.header_block(p, flags, mend, out);
            }
            // Anything else is not ours to judge (h2 refuses frames out of place).
            (_, pending) => {
                if let Some(p) = pending {
                    out.extend_from_slice(&p.frames);
                }
                out.extend_from_slice(&frame);
            }
        }
        true
    }

    /// A header block's frames are in: passes it on, mended if it must be.
    fn header_block(&mut self, p: Pending, flags: u8, mend: bool, out: &mut Vec<u8>) {
        if flags & END_HEADERS == 0 {
            self.pending = Some(p);
            return;
        }
        // The usual first block: its authority read without a whole decode.
        if !mend && first_authority_valid(&p.block) == Some(true) {
            out.extend_from_slice(&p.frames);
            self.stage = Stage::Through;
            return;
        }
        let Some(fields) = self.table.decode(&p.block) else {
            // Not HPACK this decoder can read: h2 will say what is wrong with it.
            out.extend_from_slice(&p.frames);
            self.stage = Stage::Through;
            return;
        };
        let refused = fields
            .iter()
            .any(|(n, v)| n == b":authority" && http::uri::Authority::try_from(&v[..]).is_err());
        if !mend && !refused {
            out.extend_from_slice(&p.frames);
            self.stage = Stage::Through;
            return;
        }
        if !mend {
            tracing::debug!(
                "a client names the socket as its HTTP/2 :authority; read as localhost"
            );
            self.stage = Stage::Frames { mend: true };
        }
        let mut block = Vec::with_capacity(p.block.len() * 2);
        for (name, value) in &fields {
            let value = if name == b":authority" {
                LOCALHOST
            } else {
                value
            };
            // Literal without indexing, new name (RFC 7541 6.2.2).
            block.push(0);
            literal(name, &mut block);
            literal(value, &mut block);
        }
        frames(p.stream, p.end_stream, &block, out);
    }
}

/// Whether the `:authority` of a connection's first header block is one h2
/// accepts (true also when there is none); None when this quick reading cannot
/// tell (a field named by a table entry the block itself added, bad HPACK), for
/// the whole decoder to judge. It decodes only the authority's value and literal
/// names, and keeps no table: every connection pays it.
fn first_authority_valid(block: &[u8]) -> Option<bool> {
    const STATIC_ENTRIES: usize = 61;
    const AUTHORITY: usize = 1;
    let mut at = 0;
    let mut valid = true;
    while at < block.len() {
        let prefix = prefix(block[at]);
        let (index, used) = integer(&block[at..], prefix)?;
        at += used;
        match prefix {
            5 => continue,
            7 if index == AUTHORITY => valid = false, // the static entry's value is empty
            7 if index > STATIC_ENTRIES => return None,
            7 => {}
            _ => {
                let name_is_authority = match index {
                    0 => {
                        let (name, used) = string(&block[at..])?;
                        at += used;
                        name == b":authority"
                    }
                    AUTHORITY => true,
                    i if i > STATIC_ENTRIES => return None,
                    _ => false,
                };
                if name_is_authority {
                    let (value, used) = string(&block[at..])?;
                    at += used;
                    valid &= http::uri::Authority::try_from(&value[..]).is_ok();
                } else {
                    at += skip_string(&block[at..])?;
                }
            }
        }
    }
    Some(valid)
}

/// A client's HPACK dynamic table (RFC 7541 2.3), and the decoding of header blocks
/// against it. fluke-hpack's own decoder builds a Huffman table for every string it
/// decodes (0.1 ms a block); this one shares one per thread.
struct Table {
    /// Newest first: index 62 is `entries[0]`.
    entries: std::collections::VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max: usize,
}

/// The size the client's table starts at and may not pass: the server's
/// SETTINGS_HEADER_TABLE_SIZE, h2's default, which tonic keeps.
const TABLE_SIZE: usize = 4096;

impl Default for Table {
    fn default() -> Self {
        Table {
            entries: Default::default(),
            size: 0,
            max: TABLE_SIZE,
        }
    }
}

impl Table {
    /// A header block's fields, in order; None if it is not valid HPACK.
    fn decode(&mut self, block: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut fields = vec![];
        let mut at = 0;
        while at < block.len() {
            let prefix = prefix(block[at]);
            let (index, used) = integer(&block[at..], prefix)?;
            at += used;
            match prefix {
                7 => fields.push(self.get(index)?),
                5 => {
                    if index > TABLE_SIZE {
                        return None;
                    }
                    self.max = index;
                    self.evict(0);
                }
                _ => {
                    let name = if index == 0 {
                        let (name, used) = string(&block[at..])?;
                        at += used;
                        name
                    } else {
                        self.get(index)?.0
                    };
                    let (value, used) = string(&block[at..])?;
                    at += used;
                    if prefix == 6 {
                        self.add(name.clone(), value.clone());
                    }
                    fields.push((name, value));
                }
            }
        }
        Some(fields)
    }

    fn get(&self, index: usize) -> Option<(Vec<u8>, Vec<u8>)> {
        match index {
            0 => None,
            1..=61 => static_table().get(index - 1).cloned(),
            _ => self.entries.get(index - 62).cloned(),
        }
    }

    fn add(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let size = name.len() + value.len() + 32;
        self.evict(size);
        // An entry larger than the table empties it and is not added (RFC 7541 4.4).
        if size <= self.max {
            self.size += size;
            self.entries.push_front((name, value));
        }
    }

    /// Drops the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max {
            let Some((n, v)) = self.entries.pop_back() else {
                break;
            };
            self.size -= n.len() + v.len() + 32;
        }
    }
}

/// HPACK's static table (RFC 7541 Appendix A), read once from fluke-hpack's
/// decoder, one indexed field at a time.
fn static_table() -> &'static [(Vec<u8>, Vec<u8>)] {
    static TABLE: std::sync::OnceLock<Vec<(Vec<u8>, Vec<u8>)>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        (1..=61u8)
            .map(|i| {
                let mut d = fluke_hpack::Decoder::new();
                d.decode(&[0x80 | i]).expect("a static index").remove(0)
            })
            .collect()
    })
}

/// The integer prefix of a field representation, which names its kind (RFC 7541
/// 6): 7 an indexed field, 6 a literal added to the table, 5 a table size update,
/// 4 a literal not added (or never to be).
fn prefix(first: u8) -> u8 {
    match first {
        0x80.. => 7,
        0x40..=0x7f => 6,
        0x20..=0x3f => 5,
        _ => 4,
    }
}

/// An HPACK integer with an N-bit prefix (RFC 7541 5.1), and the bytes it took.
fn integer(buf: &[u8], prefix: u8) -> Option<(usize, usize)> {
    let max = (1usize << prefix) - 1;
    let first = (*buf.first()? as usize) & max;
    if first < max {
        return Some((first, 1));
    }
    let mut value = max;
    for (i, &b) in buf[1..].iter().enumerate().take(4) {
        value += ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 2));
        }
    }
    None
}

/// The bytes an HPACK string literal takes, without decoding it.
fn skip_string(buf: &[u8]) -> Option<usize> {
    let (len, used) = integer(buf, 7)?;
    used.checked_add(len).filter(|&t| t <= buf.len())
}

/// An HPACK string literal, decoded, and the bytes it took.
fn string(buf: &[u8]) -> Option<(Vec<u8>, usize)> {
    let (len, used) = integer(buf, 7)?;
    let total = used.checked_add(len).filter(|&t| t <= buf.len())?;
    let raw = &buf[used..total];
    if buf[0] & 0x80 == 0 {
        return Some((raw.to_vec(), total));
    }
    thread_local! {
        // Built once: building its table is most of a decode's cost.
        static HUFFMAN: std::cell::RefCell<fluke_hpack::huffman::HuffmanDecoder> =
            std::cell::RefCell::new(fluke_hpack::huffman::HuffmanDecoder::new());
    }
    let decoded = HUFFMAN.with(|h| h.borrow_mut().decode(raw)).ok()?;
    Some((decoded, total))
}

/// The header block fragment of a HEADERS frame's payload, without its padding
/// and priority fields; None if they do not fit.
fn fragment(payload: &[u8], flags: u8) -> Option<&[u8]> {
    let mut start = 0;
    let mut end = payload.len();
    if flags & PADDED != 0 {
        let pad = *payload.first()? as usize;
        start = 1;
        end = end.checked_sub(pad)?;
    }
    if flags & PRIORITY != 0 {
        start += 5;
    }
    payload.get(start..end)
}

/// An HPACK string literal, not Huffman-coded.
fn literal(s: &[u8], out: &mut Vec<u8>) {
    // Integer with a 7-bit prefix (RFC 7541 5.1); the H bit stays 0.
    let mut n = s.len();
    if n < 127 {
        out.push(n as u8);
    } else {
        out.push(127);
        n -= 127;
        while n >= 128 {
            out.push((n % 128) as u8 | 0x80);
            n /= 128;
        }
        out.push(n as u8);
    }
    out.extend_from_slice(s);
}

/// A header block as a HEADERS frame, and CONTINUATION frames if it is larger
/// than a frame may be.
fn frames(stream: u32, end_stream: bool, block: &[u8], out: &mut Vec<u8>) {
    let chunks: Vec<&[u8]> = if block.is_empty() {
        vec![block]
    } else {
        block.chunks(MAX_FRAME).collect()
    };
    for (i, chunk) in chunks.iter().enumerate() {
        let mut flags = 0;
        if i == 0 && end_stream {
            flags |= END_STREAM;
        }
        if i + 1 == chunks.len() {
            flags |= END_HEADERS;
        }
        let kind = if i == 0 { HEADERS } else { CONTINUATION };
        out.extend_from_slice(&(chunk.len() as u32).to_be_bytes()[1..]);
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(chunk);
    }
}

/// A server-side connection whose incoming header blocks are mended (`Repair`);
/// what the server writes goes out untouched.
pub struct Mended<S> {
    inner: S,
    repair: Repair,
    out: Vec<u8>,
    at: usize,
    eof: bool,
}

impl<S> Mended<S> {
    pub fn new(inner: S) -> Self {
        Mended {
            inner,
            repair: Repair::default(),
            out: Vec::new(),
            at: 0,
            eof: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Mended<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.at < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.at);
                buf.put_slice(&this.out[this.at..this.at + n]);
                this.at += n;
                if this.at == this.out.len() {
                    this.out.clear();
                    this.at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.repair.is_through() || this.eof {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.eof = true;
                this.repair.finish(&mut this.out);
            } else {
                this.repair.feed(read.filled(), &mut this.out);
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Mended<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Mended<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    /// Header blocks of requests to `authority`, each by one HPACK encoder as a
    /// client keeps it (fluke's adds nothing to its table).
    fn encoded(authority: &str, paths: &[&str]) -> Vec<Vec<u8>> {
        let mut enc = fluke_hpack::Encoder::new();
        paths
            .iter()
            .map(|path| {
                enc.encode([
                    (&b":method"[..], &b"POST"[..]),
                    (b":scheme", b"http"),
                    (b":path", path.as_bytes()),
                    (b":authority", authority.as_bytes()),
                    (b"content-type", b"application/grpc"),
                ])
            })
            .collect()
    }

    /// Three requests as grpc-go encodes them: new fields go into the table
    /// (literals with incremental indexing, names from the static table), later
    /// requests name them by index.
    fn indexed_like_grpc_go(authority: &str) -> Vec<Vec<u8>> {
        let lit = |v: &str| {
            let mut b = vec![];
            literal(v.as_bytes(), &mut b);
            b
        };
        // :method POST, :scheme http (static 3 and 6), then :path (static name 4),
        // :authority (1), content-type (31), each added to the table.
        let mut first = vec![0x83, 0x86, 0x44];
        first.extend(lit("/a"));
        first.push(0x41);
        first.extend(lit(authority));
        first.push(0x5f);
        first.extend(lit("application/grpc"));
        // Table now: 62 content-type, 63 :authority, 64 :path /a. Each new :path
        // goes in first and shifts the others by one.
        let next = |path: &str, added: u8| {
            let mut b = vec![0x83, 0x86, 0x44];
            b.extend(lit(path));
            b.extend([0x80 | (63 + added), 0x80 | (62 + added)]);
            b
        };
        vec![first, next("/b", 1), next("/c", 2)]
    }

    /// A client's bytes: the preface, SETTINGS, then each header block as a HEADERS
    /// frame (or two, `split` by a CONTINUATION) and a DATA frame, on odd streams.
    fn client(blocks: &[Vec<u8>], split: bool) -> Vec<u8> {
        let mut bytes = PREFACE.to_vec();
        frame_into(&mut bytes, 0x4, 0, 0, &[]);
        for (i, block) in blocks.iter().enumerate() {
            let stream = 2 * i as u32 + 1;
            if split {
                let (a, b) = block.split_at(block.len() / 2);
                frame_into(&mut bytes, HEADERS, 0, stream, a);
                frame_into(&mut bytes, CONTINUATION, END_HEADERS, stream, b);
            } else {
                frame_into(&mut bytes, HEADERS, END_HEADERS, stream, block);
            }
            frame_into(&mut bytes, 0x0, END_STREAM, stream, &[0, 0, 0, 0, 0]);
        }
        bytes
    }

    fn frame_into(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
    }

    /// What a server reads: every header block decoded, and the kinds of the frames.
    fn server(bytes: &[u8]) -> (Vec<Fields>, Vec<u8>) {
        assert!(bytes.starts_with(PREFACE));
        let mut rest = &bytes[PREFACE.len()..];
        let mut dec = fluke_hpack::Decoder::new();
        let (mut blocks, mut kinds, mut block) = (vec![], vec![], vec![]);
        while !rest.is_empty() {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            let (kind, flags) = (rest[3], rest[4]);
            kinds.push(kind);
            if kind == HEADERS || kind == CONTINUATION {
                block.extend_from_slice(fragment(&rest[9..9 + len], flags).unwrap());
                if flags & END_HEADERS != 0 {
                    blocks.push(dec.decode(&block).unwrap());
                    block.clear();
                }
            }
            rest = &rest[9 + len..];
        }
        (blocks, kinds)
    }

    /// Feeds `bytes` in pieces of `piece` bytes, as reads may cut them anywhere.
    fn mend(bytes: &[u8], piece: usize) -> (Vec<u8>, bool) {
        let (mut r, mut out) = (Repair::default(), vec![]);
        for p in bytes.chunks(piece) {
            r.feed(p, &mut out);
        }
        let through = r.is_through();
        r.finish(&mut out);
        (out, through)
    }

    fn authority(fields: &Fields) -> &[u8] {
        &fields.iter().find(|(n, _)| n == b":authority").unwrap().1
    }

    #[test]
    fn a_valid_authority_passes_untouched() {
        let bytes = client(&encoded("localhost", &["/a", "/b"]), false);
        for piece in [1, 7, 4096] {
            let (out, through) = mend(&bytes, piece);
            assert_eq!(out, bytes);
            assert!(through, "the first block decides");
        }
    }

    #[test]
    fn a_path_authority_reads_as_localhost_in_every_request() {
        let sock = "/var/lib/kubelet/plugins/localvol.csi.io/csi.sock";
        // The second and third requests name the authority by the client's table.
        for split in [false, true] {
            let bytes = client(&indexed_like_grpc_go(sock), split);
            for piece in [1, 9, 100, 1 << 16] {
                let (out, through) = mend(&bytes, piece);
                assert!(!through);
                let (blocks, kinds) = server(&out);
                assert_eq!(blocks.len(), 3);
                for (b, path) in blocks.iter().zip(["/a", "/b", "/c"]) {
                    assert_eq!(authority(b), LOCALHOST);
                    let p = b.iter().find(|(n, _)| n == b":path").unwrap();
                    assert_eq!(p.1, path.as_bytes());
                    assert_eq!(b.len(), 5);
                }
                // SETTINGS, then HEADERS (one frame each, mended) and DATA.
                assert_eq!(kinds, vec![0x4, 1, 0, 1, 0, 1, 0]);
                // The DATA frames are the client's, byte for byte.
                assert!(out.ends_with(&[0, 0, 5, 0, 1, 0, 0, 0, 5, 0, 0, 0, 0, 0]));
            }
        }
    }

    #[test]
    fn a_large_block_is_cut_into_frames() {
        let mut out = vec![];
        let block = vec![7u8; MAX_FRAME * 2 + 10];
        frames(3, true, &block, &mut out);
        let mut kinds = vec![];
        let mut rest = &out[..];
        let mut total = 0;
        while !rest.is_empty() {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            kinds.push((rest[3], rest[4]));
            total += len;
            rest = &rest[9 + len..];
        }
        assert_eq!(total, block.len());
        assert_eq!(
            kinds,
            vec![
                (HEADERS, END_STREAM),
                (CONTINUATION, 0),
                (CONTINUATION, END_HEADERS)
            ]
        );
        let mut lit = vec![];
        literal(&[b'x'; 300], &mut lit);
        assert_eq!(&lit[..3], &[127, 173, 1]); // 300 = 127 + 173
    }

    /// The first block of a real h2 client (hyper's, Huffman-coding what it
    /// can): its authority is read on the quick path, and found valid.
    #[tokio::test]
    async fn a_real_clients_first_block_is_judged_without_a_full_decode() {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let client = tokio::spawn(async move {
            let c = crate::client::connect_direct(&sock).await.unwrap();
            let mut node = crate::proto::node_client::NodeClient::with_origin(
                c,
                tonic::codegen::http::Uri::from_static(crate::client::ORIGIN),
            );
            // No server answers; the request's bytes are all this needs.
            let _ = node
                .node_get_capabilities(crate::proto::NodeGetCapabilitiesRequest {})
                .await;
        });
        let (mut conn, _) = listener.accept().await.unwrap();
        let (mut bytes, mut buf) = (Vec::new(), [0u8; 4096]);
        let block = loop {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "the client closed before its request");
            bytes.extend_from_slice(&buf[..n]);
            let mut rest = &bytes[PREFACE.len().min(bytes.len())..];
            let mut found = None;
            while rest.len() >= 9 {
                let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
                if rest.len() < 9 + len {
                    break;
                }
                if rest[3] == HEADERS {
                    found = Some(fragment(&rest[9..9 + len], rest[4]).unwrap().to_vec());
                }
                rest = &rest[9 + len..];
            }
            if let Some(b) = found {
                break b;
            }
        };
        client.abort();
        assert_eq!(first_authority_valid(&block), Some(true));
        let fields = fluke_hpack::Decoder::new().decode(&block).unwrap();
        assert!(fields.iter().any(|(n, _)| n == b":authority"), "{fields:?}");
        assert_eq!(Table::default().decode(&block), Some(fields.clone()));
        // Its authority is a literal naming the static entry (0x41), its value
        // Huffman-coded: what the quick reading had to decode.
        let at = block
            .iter()
            .position(|&b| b == 0x41)
            .expect("a literal authority");
        assert_ne!(block[at + 1] & 0x80, 0, "{block:02x?}");
        // Integers of every length read back.
        for n in [0, 5, 126, 127, 128, 300, 70_000] {
            let mut lit = vec![];
            literal(&vec![b'a'; n], &mut lit);
            assert_eq!(integer(&lit, 7), Some((n, lit.len() - n)));
        }
    }

    #[test]
    fn the_quick_reading_agrees_with_a_whole_decode() {
        let path = "/run/csi/socket";
        for (block, want) in [
            (encoded("localhost", &["/a"]).remove(0), Some(true)),
            (encoded(path, &["/a"]).remove(0), Some(false)),
            (indexed_like_grpc_go(path).remove(0), Some(false)),
            (indexed_like_grpc_go("localhost").remove(0), Some(true)),
            // A later block names the authority by the table: left to the decoder.
            (indexed_like_grpc_go("localhost").remove(1), None),
            (vec![0x82, 0x86], Some(true)),
        ] {
            assert_eq!(first_authority_valid(&block), want, "{block:?}");
        }
    }

    /// The table agrees with fluke-hpack's decoder, eviction and size updates
    /// included.
    #[test]
    fn the_table_decodes_as_fluke_does() {
        let lit = |v: &[u8]| {
            let mut b = vec![];
            literal(v, &mut b);
            b
        };
        let mut blocks = indexed_like_grpc_go("/run/x.sock");
        blocks.extend(encoded("localhost", &["/a", "/b"]));
        // Large fields added until the oldest are evicted, then named by index.
        for i in 0..12u8 {
            let mut b = vec![0x40];
            b.extend(lit(format!("x-big-{i}").as_bytes()));
            b.extend(lit(&vec![b'a' + i; 500]));
            b.extend([0x80 | 62, 0x80 | 63, 0x80 | 64]);
            blocks.push(b);
        }
        // A size update shrinks the table, then a field is added to it.
        let mut b = vec![0x3f, 0xe1, 0x07]; // 1024: 31 + 993
        b.push(0x41);
        b.extend(lit(b"localhost"));
        b.push(0x80 | 62);
        blocks.push(b);
        let (mut ours, mut theirs) = (Table::default(), fluke_hpack::Decoder::new());
        for b in &blocks {
            assert_eq!(ours.decode(b), Some(theirs.decode(b).unwrap()), "{b:?}");
        }
        assert!(ours.size <= 1024 && !ours.entries.is_empty());
        // Bad HPACK is None, never a panic.
        for bad in [
            &[0x80][..],
            &[0xff, 0xff],
            &[0x40, 0x05, b'a'],
            &[0x3f, 0xff, 0x7f],
        ] {
            assert_eq!(Table::default().decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn anything_but_http2_passes_untouched() {
        let bytes = b"GET / HTTP/1.1\r\nHost: /x\r\n\r\n more".to_vec();
        let (out, through) = mend(&bytes, 5);
        assert_eq!(out, bytes);
        assert!(through);
        // A connection cut short passes on what it sent.
        let short = &client(&encoded("/x.sock", &["/a"]), false)[..40];
        assert_eq!(mend(short, 3).0, short);
    }
}
