//! Reply assembly: applies the validated chunks of one request and decides its outcome.
//! Pure (no I/O), fuzzed together with the parsers.

use std::collections::BTreeMap;

use super::{Chunk, Extent, MAX_READ_REQUEST};
use crate::error::{Error, Result};

/// A request's error as reported by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub errno: u32,
    pub message: String,
    pub offset: Option<u64>,
}

/// Collects the chunks of one READ: copies data, remembers holes, and checks that chunks do
/// not overlap and (on success) cover the whole request.
#[derive(Debug)]
pub struct ReadAssembler {
    offset: u64,
    buf: Vec<u8>,
    /// Covered ranges relative to `offset`: start -> len, never overlapping.
    covered: BTreeMap<u64, u64>,
    covered_bytes: u64,
    holes: Vec<(u64, u64)>,
    error: Option<ServerError>,
}

/// A completed read: data (holes are zeros) and the hole ranges (absolute offsets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadReply {
    pub data: Vec<u8>,
    pub holes: Vec<(u64, u64)>,
}

impl ReadAssembler {
    /// `len` must be at most [`MAX_READ_REQUEST`]; the client guarantees this.
    pub fn new(offset: u64, len: u32) -> Self {
        let len = len.min(MAX_READ_REQUEST);
        ReadAssembler {
            offset,
            buf: vec![0; len as usize],
            covered: BTreeMap::new(),
            covered_bytes: 0,
            holes: Vec::new(),
            error: None,
        }
    }

    fn cover(&mut self, abs: u64, len: u64) -> Result<usize> {
        let rel = abs
            .checked_sub(self.offset)
            .filter(|r| {
                r.checked_add(len)
                    .is_some_and(|e| e <= self.buf.len() as u64)
            })
            .ok_or_else(|| Error::nbd("NBD_CMD_READ reply", "chunk outside request"))?;
        let overlaps_prev = self
            .covered
            .range(..=rel)
            .next_back()
            .is_some_and(|(s, l)| s + l > rel);
        let overlaps_next = self
            .covered
            .range(rel..)
            .next()
            .is_some_and(|(s, _)| *s < rel + len);
        if overlaps_prev || overlaps_next {
            return Err(Error::nbd("NBD_CMD_READ reply", "overlapping chunks"));
        }
        self.covered.insert(rel, len);
        self.covered_bytes += len;
        Ok(rel as usize)
    }

    /// Claims `[abs, abs+len)` for data the caller reads straight into the buffer, and lends
    /// the buffer out with the claimed range's start in it. The caller must [`give_back`] the
    /// buffer before the next chunk of this request (a request without its buffer fails in
    /// [`finish`]).
    ///
    /// [`give_back`]: Self::give_back
    /// [`finish`]: Self::finish
    pub fn lend_for(&mut self, abs: u64, len: u64) -> Result<(Vec<u8>, usize)> {
        let rel = self.cover(abs, len)?;
        Ok((std::mem::take(&mut self.buf), rel))
    }

    /// Takes back the buffer lent by [`lend_for`](Self::lend_for).
    pub fn give_back(&mut self, buf: Vec<u8>) {
        self.buf = buf;
    }

    /// Applies one validated chunk.
    pub fn apply(&mut self, chunk: &Chunk<'_>) -> Result<()> {
        match chunk {
            Chunk::None => Ok(()),
            Chunk::Data { offset, data } => {
                let rel = self.cover(*offset, data.len() as u64)?;
                self.buf[rel..rel + data.len()].copy_from_slice(data);
                Ok(())
            }
            Chunk::Hole { offset, len } => {
                let rel = self.cover(*offset, u64::from(*len))?;
                self.buf[rel..rel + *len as usize].fill(0);
                self.holes.push((*offset, u64::from(*len)));
                Ok(())
            }
            Chunk::Error {
                errno,
                message,
                offset,
            } => {
                if self.error.is_none() {
                    self.error = Some(ServerError {
                        errno: *errno,
                        message: message.clone(),
                        offset: *offset,
                    });
                }
                Ok(())
            }
            Chunk::BlockStatus { .. } => Err(Error::nbd(
                "NBD_CMD_READ reply",
                "block status chunk in a read reply",
            )),
        }
    }

    /// Called after the DONE chunk: the read's data, or the server's error.
    pub fn finish(mut self) -> Result<Result<ReadReply, ServerError>> {
        if let Some(e) = self.error {
            return Ok(Err(e));
        }
        // Chunks never overlap (checked in `cover`), so full coverage == byte count.
        if self.covered_bytes != self.buf.len() as u64 {
            return Err(Error::nbd(
                "NBD_CMD_READ reply",
                format!(
                    "chunks cover {} of {} bytes",
                    self.covered_bytes,
                    self.buf.len()
                ),
            ));
        }
        self.holes.sort_unstable();
        Ok(Ok(ReadReply {
            data: self.buf,
            holes: self.holes,
        }))
    }
}

/// Extents per negotiated context id.
pub type ContextExtents = Vec<(u32, Vec<Extent>)>;

/// Collects the chunks of one BLOCK_STATUS request (one chunk per negotiated context).
#[derive(Debug, Default)]
pub struct BlockStatusAssembler {
    per_context: Vec<(u32, Vec<Extent>)>,
    error: Option<ServerError>,
}

impl BlockStatusAssembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one validated chunk.
    pub fn apply(&mut self, chunk: Chunk<'_>) -> Result<()> {
        match chunk {
            Chunk::None => Ok(()),
            Chunk::BlockStatus { context, extents } => {
                if self.per_context.iter().any(|(c, _)| *c == context) {
                    return Err(Error::nbd(
                        "NBD_CMD_BLOCK_STATUS reply",
                        format!("second chunk for context id {context}"),
                    ));
                }
                self.per_context.push((context, extents));
                Ok(())
            }
            Chunk::Error {
                errno,
                message,
                offset,
            } => {
                if self.error.is_none() {
                    self.error = Some(ServerError {
                        errno,
                        message,
                        offset,
                    });
                }
                Ok(())
            }
            Chunk::Data { .. } | Chunk::Hole { .. } => Err(Error::nbd(
                "NBD_CMD_BLOCK_STATUS reply",
                "data chunk in a block status reply",
            )),
        }
    }

    /// Called after the DONE chunk: the extents per context id, or the server's error.
    pub fn finish(self) -> Result<Result<ContextExtents, ServerError>> {
        if let Some(e) = self.error {
            return Ok(Err(e));
        }
        Ok(Ok(self.per_context))
    }
}

/// Clips extents so that they cover at most `len` bytes (a server may describe more than was
/// asked in its last extent).
pub fn clip_extents(extents: Vec<Extent>, len: u64) -> Vec<Extent> {
    let mut out = Vec::with_capacity(extents.len());
    let mut left = len;
    for e in extents {
        if left == 0 {
            break;
        }
        let l = e.length.min(left);
        out.push(Extent {
            length: l,
            flags: e.flags,
        });
        left -= l;
    }
    out
}

/// Collects the structured chunks of a command that returns no data (WRITE, FLUSH): only
/// NONE and ERROR chunks are legal.
#[derive(Debug, Default)]
pub struct AckAssembler {
    error: Option<ServerError>,
}

impl AckAssembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one validated chunk.
    pub fn apply(&mut self, chunk: Chunk<'_>) -> Result<()> {
        match chunk {
            Chunk::None => Ok(()),
            Chunk::Error {
                errno,
                message,
                offset,
            } => {
                if self.error.is_none() {
                    self.error = Some(ServerError {
                        errno,
                        message,
                        offset,
                    });
                }
                Ok(())
            }
            Chunk::Data { .. } | Chunk::Hole { .. } | Chunk::BlockStatus { .. } => Err(Error::nbd(
                "NBD_CMD_WRITE reply",
                "data or status chunk in a write reply",
            )),
        }
    }

    /// Called after the DONE chunk: success, or the server's error.
    pub fn finish(self) -> Result<Result<(), ServerError>> {
        Ok(match self.error {
            Some(e) => Err(e),
            None => Ok(()),
        })
    }
}
