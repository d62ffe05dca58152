//! Streams (memory and device state, VM configuration): content-defined chunks, deduplicated
//! like disk chunks, listed by stream index blobs.
use std::io::Read;

use vmkeep_core::blob;
use vmkeep_core::keys::BlobKind;
use vmkeep_core::manifest::StreamRecord;
use vmkeep_core::stream::{self, CdcParams, StreamChunker, StreamEntry, ENTRIES_PER_BLOB};
use vmkeep_core::BlobId;

use super::BackupSession;
use crate::error::{Error, Result};
use crate::packer::EncodedBlob;
use crate::progress::Progress;

impl BackupSession<'_> {
    fn put_blob(&mut self, kind: BlobKind, data: &[u8]) -> Result<(BlobId, bool)> {
        let id = self.repo.keys.blob_id(kind, data);
        if !self.dedup.claim(&id) {
            return Ok((id, false));
        }
        let encoded = blob::encode(&self.repo.keys, kind, &id, data);
        let msg = EncodedBlob {
            kind,
            id,
            raw_len: data.len() as u32,
            data: encoded,
        };
        let packer = self.packer.as_ref().expect("session open");
        if packer.sender().send(msg).is_err() {
            return Err(self.packer.take().expect("session open").failure());
        }
        Ok((id, true))
    }

    /// Add a stream read to its end from `source`.
    pub fn add_stream(
        &mut self,
        name: &str,
        source: &mut dyn Read,
        params: CdcParams,
        progress: &dyn Progress,
    ) -> Result<&StreamRecord> {
        vmkeep_core::manifest::validate_name("stream name", name)?;
        if self.streams.iter().any(|s| s.name == name) {
            return Err(Error::Invalid {
                what: "stream name",
                reason: format!("{name:?} given twice"),
            });
        }
        progress.phase(&format!("stream {name}"), 0);
        let mut chunker = StreamChunker::new(params);
        let mut entries: Vec<StreamEntry> = Vec::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = match source.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(Error::SourceRead {
                        path: format!("stream {name}").into(),
                        cause: e,
                    })
                }
            };
            size += n as u64;
            self.stats.read_bytes += n as u64;
            progress.advance(n as u64);
            for chunk in chunker.push(&buf[..n]) {
                entries.push(self.stream_chunk(&chunk)?);
            }
        }
        let tail: Vec<Vec<u8>> = chunker.finish();
        for chunk in tail {
            entries.push(self.stream_chunk(&chunk)?);
        }
        let mut index = Vec::new();
        for part in entries.chunks(ENTRIES_PER_BLOB) {
            let bytes = stream::encode_index_blob(part);
            index.push(self.put_blob(BlobKind::Tree, &bytes)?.0);
        }
        progress.finish_phase();
        self.streams.push(StreamRecord {
            name: name.to_string(),
            size,
            index,
        });
        Ok(self.streams.last().expect("just pushed"))
    }

    fn stream_chunk(&mut self, chunk: &[u8]) -> Result<StreamEntry> {
        let (id, new) = self.put_blob(BlobKind::Data, chunk)?;
        if new {
            self.stats.new_bytes += chunk.len() as u64;
            self.stats.chunks_new += 1;
        } else {
            self.stats.chunks_reused += 1;
        }
        Ok(StreamEntry {
            id,
            len: chunk.len() as u32,
        })
    }
}
