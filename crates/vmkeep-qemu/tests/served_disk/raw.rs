//! A blocking NBD client written byte by byte, as a hostile peer would speak.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vmkeep_qemu::nbd::proto::*;

use super::NAME;

/// A structured reply chunk as received.
#[derive(Debug)]
pub struct RawChunk {
    pub flags: u16,
    pub chunk_type: u16,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

/// A blocking client that speaks NBD by hand, byte by byte, as a hostile peer would.
pub struct Raw {
    pub s: UnixStream,
}

impl Raw {
    /// Connects; every read gives up after 20 s so a broken server fails the test, not hangs.
    pub fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Raw { s }
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    pub fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).unwrap();
        v
    }

    /// Reads the server greeting and checks it.
    pub fn read_greeting(&mut self) {
        let g = self.recv(18);
        assert_eq!(
            &g[..16],
            &[NBDMAGIC.to_be_bytes(), IHAVEOPT.to_be_bytes()].concat()
        );
        assert_eq!(
            u16::from_be_bytes([g[16], g[17]]),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
    }

    /// Reads the greeting and sends `client_flags`.
    pub fn greet(&mut self, client_flags: u32) {
        self.read_greeting();
        self.send(&client_flags.to_be_bytes());
    }

    pub fn option(&mut self, opt: u32, data: &[u8]) {
        self.send(&encode_option(opt, data));
    }

    /// One option reply: `(type, payload)`, checking magic and the option echoed.
    pub fn reply(&mut self, opt: u32) -> (u32, Vec<u8>) {
        let h = self.recv(20);
        let h = parse_option_reply_header(&h, opt).unwrap();
        (h.reply_type, self.recv(h.len as usize))
    }

    /// Sends `opt` and returns its replies up to and including the final one.
    pub fn haggle(&mut self, opt: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        self.option(opt, data);
        let mut v = Vec::new();
        loop {
            let r = self.reply(opt);
            let last = r.0 == REP_ACK || r.0 & REP_FLAG_ERROR != 0;
            v.push(r);
            if last {
                return v;
            }
        }
    }

    /// A client in transmission: structured replies and `base:allocation` when asked.
    pub fn start(path: &Path, structured: bool, meta: bool) -> Raw {
        let mut c = Raw::connect(path);
        c.greet(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES);
        c.negotiate(structured, meta);
        c
    }

    /// The options after the client flags, up to NBD_OPT_GO.
    pub fn negotiate(&mut self, structured: bool, meta: bool) {
        if structured {
            assert_eq!(self.haggle(OPT_STRUCTURED_REPLY, &[])[0].0, REP_ACK);
        }
        if meta {
            let q = encode_meta_context_request(NAME, &["base:allocation"]);
            let r = self.haggle(OPT_SET_META_CONTEXT, &q);
            assert_eq!(r.len(), 2, "{r:?}");
        }
        let r = self.haggle(OPT_GO, &encode_go_request(NAME));
        assert_eq!(r.last().unwrap().0, REP_ACK, "{r:?}");
    }

    pub fn request(&mut self, flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) {
        self.send(&encode_request(flags, cmd, cookie, offset, len));
    }

    /// A simple reply: `(errno, cookie)`.
    pub fn simple(&mut self) -> (u32, u64) {
        let b = self.recv(16);
        assert_eq!(
            u32::from_be_bytes(b[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        let p = parse_simple_reply(&b[4..]).unwrap();
        (p.errno, p.cookie)
    }

    pub fn chunk(&mut self) -> RawChunk {
        let b = self.recv(20);
        assert_eq!(
            u32::from_be_bytes(b[0..4].try_into().unwrap()),
            STRUCTURED_REPLY_MAGIC
        );
        let len = u32::from_be_bytes(b[16..20].try_into().unwrap());
        assert!(len <= 64 * 1024 * 1024, "chunk of {len} bytes");
        RawChunk {
            flags: u16::from_be_bytes([b[4], b[5]]),
            chunk_type: u16::from_be_bytes([b[6], b[7]]),
            cookie: u64::from_be_bytes(b[8..16].try_into().unwrap()),
            payload: self.recv(len as usize),
        }
    }

    /// All chunks of the next structured reply (up to DONE); they must all carry `cookie`.
    pub fn reply_chunks(&mut self, cookie: u64) -> Vec<RawChunk> {
        let mut v = Vec::new();
        loop {
            let c = self.chunk();
            assert_eq!(c.cookie, cookie);
            let done = c.flags & REPLY_FLAG_DONE != 0;
            v.push(c);
            if done {
                return v;
            }
        }
    }

    /// The errno of a structured reply that must be one error chunk.
    pub fn error(&mut self, cookie: u64) -> u32 {
        let c = self.reply_chunks(cookie);
        assert_eq!(c.len(), 1, "{c:?}");
        assert!(c[0].chunk_type & 0x8000 != 0, "{c:?}");
        u32::from_be_bytes(c[0].payload[0..4].try_into().unwrap())
    }

    /// A structured READ: the bytes (holes as zeros), or the errno of its error chunk.
    pub fn read(&mut self, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(0, CMD_READ, cookie, offset, len);
        self.read_reply(cookie, offset, len)
    }

    pub fn read_reply(&mut self, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        let mut data = vec![0u8; len as usize];
        let mut covered = 0u64;
        let mut errno = None;
        for c in self.reply_chunks(cookie) {
            let at = |p: &[u8]| u64::from_be_bytes(p[0..8].try_into().unwrap()) - offset;
            match c.chunk_type {
                REPLY_TYPE_OFFSET_DATA => {
                    let rel = at(&c.payload) as usize;
                    let d = &c.payload[8..];
                    data[rel..rel + d.len()].copy_from_slice(d);
                    covered += d.len() as u64;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    covered += u64::from(u32::from_be_bytes(c.payload[8..12].try_into().unwrap()));
                }
                t if t & 0x8000 != 0 => {
                    errno = Some(u32::from_be_bytes(c.payload[0..4].try_into().unwrap()))
                }
                REPLY_TYPE_NONE => {}
                t => panic!("unexpected chunk type {t}"),
            }
        }
        match errno {
            Some(e) => Err(e),
            None => {
                assert_eq!(covered, u64::from(len), "chunks must cover the read");
                Ok(data)
            }
        }
    }

    /// True when the server closed the connection (EOF or reset) without sending anything.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
        }
    }
}
