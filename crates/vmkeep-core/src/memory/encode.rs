//! The writer's side of a memory stream: bytes in, pieces out (page image chunks, chunks of the
//! literal stream and of the op stream), in bounded memory.
use super::assemble::{Assembled, PageAssembler};
use super::ops::OpsWriter;
use super::qemu::{ParseReport, QemuParser, RamBlock, RecordSink};
use crate::stream::{CdcParams, StreamChunker};

/// Literal and op bytes are handed to their chunkers in pieces of at least this size.
const BATCH: usize = 256 << 10;

/// What the encoder produces, in an order the repository can apply as it comes: each page
/// image announced before its chunks, which come in ascending order.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// The next page image (numbered from 0 in this order) holds pages of this RAM block.
    NewImage(RamBlock),
    /// The next chunk of the op stream.
    Ops(Vec<u8>),
    /// The next chunk of the literal stream.
    Literal(Vec<u8>),
    /// A finished page image chunk.
    Image {
        image: u32,
        chunk: u64,
        data: Vec<u8>,
    },
}

/// How a memory stream is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryLayout {
    /// Parse QEMU's framing into page images (false: everything is literal, a plain
    /// content-defined stream).
    pub parse: bool,
    /// Chunk size of the page images.
    pub image_chunk: u32,
    /// Content-defined chunking of the literal and op streams.
    pub cdc: CdcParams,
}

impl MemoryLayout {
    /// vmkeep's choice (FORMAT.md §11.3): 16 KiB image chunks, literals and ops in 8/16/64 KiB
    /// content-defined chunks.
    pub const DEFAULT: MemoryLayout = MemoryLayout {
        parse: true,
        image_chunk: 16 << 10,
        cdc: CdcParams::MEMORY,
    };

    pub fn validate(&self) -> crate::Result<()> {
        super::validate_image_chunk_size(self.image_chunk)?;
        self.cdc.validate()
    }
}

/// The sink side: everything but the parser (split so the parser can borrow it).
struct Sink {
    assembler: PageAssembler,
    blocks: Vec<RamBlock>,
    ops: OpsWriter,
    /// Literal bytes since the last op.
    run: u64,
    literal: Vec<u8>,
    literal_cdc: StreamChunker,
    literal_size: u64,
    ops_cdc: StreamChunker,
    ops_size: u64,
    out: Vec<Piece>,
}

impl Sink {
    fn flush_run(&mut self) {
        if self.run > 0 {
            self.ops.literal(self.run);
            self.run = 0;
        }
    }

    fn feed_literal(&mut self, force: bool) {
        if self.literal.len() >= BATCH || (force && !self.literal.is_empty()) {
            self.literal_size += self.literal.len() as u64;
            let chunks = self.literal_cdc.push(&self.literal);
            self.literal.clear();
            self.out.extend(chunks.into_iter().map(Piece::Literal));
        }
    }

    fn feed_ops(&mut self, force: bool) {
        if self.ops.pending_len() >= BATCH || (force && self.ops.pending_len() > 0) {
            let bytes = self.ops.take();
            self.ops_size += bytes.len() as u64;
            let chunks = self.ops_cdc.push(&bytes);
            self.out.extend(chunks.into_iter().map(Piece::Ops));
        }
    }

    fn take_images(&mut self) {
        let (out, blocks) = (&mut self.out, &self.blocks);
        self.assembler.drain_into(|a| out.push(piece(a, blocks)));
    }
}

fn piece(a: Assembled, blocks: &[RamBlock]) -> Piece {
    match a {
        Assembled::NewImage { block, .. } => Piece::NewImage(blocks[block as usize].clone()),
        Assembled::Chunk { image, chunk, data } => Piece::Image { image, chunk, data },
    }
}

impl RecordSink for Sink {
    fn literal(&mut self, bytes: &[u8]) {
        self.literal.extend_from_slice(bytes);
        self.run += bytes.len() as u64;
        self.feed_literal(false);
    }

    fn blocks(&mut self, blocks: &[RamBlock]) {
        self.assembler.set_blocks(blocks);
        self.blocks = blocks.to_vec();
    }

    fn page(&mut self, block: usize, page: u64, data: &[u8]) {
        match self.assembler.page(block, page, data) {
            Some(image) => {
                self.flush_run();
                self.ops.page(image, page);
                self.feed_ops(false);
                self.take_images();
            }
            None => {
                self.take_images();
                self.literal(data);
            }
        }
    }

    fn zero_page(&mut self, block: usize, page: u64) {
        self.assembler.zero_page(block, page);
        self.take_images();
    }
}

/// Sizes of the finished streams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedSizes {
    pub literal: u64,
    pub ops: u64,
    /// Pages placed into page images.
    pub pages: u64,
    pub parse: ParseReport,
}

pub struct MemoryEncoder {
    parser: Option<QemuParser>,
    sink: Sink,
}

impl MemoryEncoder {
    /// Panics if the layout's chunking parameters or image chunk size are invalid.
    pub fn new(layout: MemoryLayout) -> MemoryEncoder {
        MemoryEncoder {
            parser: layout.parse.then(QemuParser::new),
            sink: Sink {
                assembler: PageAssembler::new(layout.image_chunk),
                blocks: Vec::new(),
                ops: OpsWriter::new(),
                run: 0,
                literal: Vec::with_capacity(BATCH + (64 << 10)),
                literal_cdc: StreamChunker::new(layout.cdc),
                literal_size: 0,
                ops_cdc: StreamChunker::new(layout.cdc),
                ops_size: 0,
                out: Vec::new(),
            },
        }
    }

    /// The next bytes of the stream; returns the pieces now complete.
    pub fn push(&mut self, data: &[u8]) -> Vec<Piece> {
        match &mut self.parser {
            Some(p) => p.push(data, &mut self.sink),
            None => self.sink.literal(data),
        }
        std::mem::take(&mut self.sink.out)
    }

    /// End of the stream: the remaining pieces. When no page went into an image, no op piece
    /// is produced (none was before: ops are only cut after a page) and `sizes.pages` is 0:
    /// the stream is a plain stream of its literals.
    pub fn finish(mut self) -> (Vec<Piece>, EncodedSizes) {
        let parse = match self.parser.take() {
            Some(p) => p.finish(&mut self.sink),
            None => ParseReport::default(),
        };
        let s = &mut self.sink;
        for a in s.assembler.finish() {
            s.out.push(piece(a, &s.blocks));
        }
        s.feed_literal(true);
        let literal_cdc =
            std::mem::replace(&mut s.literal_cdc, StreamChunker::new(CdcParams::MEMORY));
        s.out
            .extend(literal_cdc.finish().into_iter().map(Piece::Literal));
        let pages = s.assembler.placed_pages();
        if pages > 0 {
            s.flush_run();
            s.feed_ops(true);
            let ops_cdc = std::mem::replace(&mut s.ops_cdc, StreamChunker::new(CdcParams::MEMORY));
            s.out.extend(ops_cdc.finish().into_iter().map(Piece::Ops));
        }
        let sizes = EncodedSizes {
            literal: s.literal_size,
            ops: if pages > 0 { s.ops_size } else { 0 },
            pages,
            parse,
        };
        (std::mem::take(&mut s.out), sizes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::ops::{Op, OpsDecoder};
    use crate::memory::qemu::tests::{page, Builder};
    use proptest::prelude::*;

    /// Everything the pieces say, put back together the way a reader does.
    fn regenerate(pieces: &[Piece], sizes: &EncodedSizes, chunk: u64) -> Vec<u8> {
        let mut literal = Vec::new();
        let mut ops = Vec::new();
        let mut images: Vec<Vec<u8>> = Vec::new();
        let mut last: Vec<Option<u64>> = Vec::new();
        for p in pieces {
            match p {
                Piece::NewImage(b) => {
                    images.push(vec![0u8; b.size as usize]);
                    last.push(None);
                }
                Piece::Literal(d) => literal.extend_from_slice(d),
                Piece::Ops(d) => ops.extend_from_slice(d),
                Piece::Image {
                    image,
                    chunk: c,
                    data,
                } => {
                    let b = *image as usize;
                    assert!(last[b].is_none_or(|l| l < *c), "ascending chunks");
                    last[b] = Some(*c);
                    let at = (*c * chunk) as usize;
                    images[b][at..at + data.len()].copy_from_slice(data);
                }
            }
        }
        assert_eq!(literal.len() as u64, sizes.literal);
        if sizes.pages == 0 {
            assert!(ops.is_empty());
            return literal;
        }
        assert_eq!(ops.len() as u64, sizes.ops);
        let mut d = OpsDecoder::new();
        d.push(&ops);
        let mut out = Vec::new();
        let mut lit = &literal[..];
        while let Some(op) = d.next_op().unwrap() {
            match op {
                Op::Literal(n) => {
                    let (a, b) = lit.split_at(n as usize);
                    out.extend_from_slice(a);
                    lit = b;
                }
                Op::Page { block, page } => {
                    let at = page as usize * 4096;
                    out.extend_from_slice(&images[block as usize][at..at + 4096]);
                }
            }
        }
        d.finish().unwrap();
        assert!(lit.is_empty());
        out
    }

    fn encode(bytes: &[u8], layout: MemoryLayout, piece: usize) -> (Vec<Piece>, EncodedSizes) {
        let mut e = MemoryEncoder::new(layout);
        let mut pieces = Vec::new();
        for p in bytes.chunks(piece) {
            pieces.extend(e.push(p));
        }
        let (rest, sizes) = e.finish();
        pieces.extend(rest);
        (pieces, sizes)
    }

    fn layout(image_chunk: u32) -> MemoryLayout {
        MemoryLayout {
            image_chunk,
            ..MemoryLayout::DEFAULT
        }
    }

    fn stream(pages: u64) -> Vec<u8> {
        let mut b = Builder::new(&[("pc.ram", pages * 4096), ("pc.rom", 4 * 4096)]);
        b.part(false);
        for p in 0..pages {
            match p % 5 {
                0 => b.zero(0, p),
                _ => b.page(0, p, &page(p)),
            }
            if p == 3 {
                b.page(0, pages - 1, &page(1000)); // ahead of the scan
                b.page(1, 2, &page(2000));
            }
        }
        b.eos_footer(1);
        b.part(true);
        b.page(1, 0, &page(3000));
        // A second copy of a page already sent: stays literal.
        b.page(0, 1, &page(4000));
        b.eos_footer(1);
        b.devices_and_end();
        b.out
    }

    #[test]
    fn pages_go_to_images_and_come_back() {
        let bytes = stream(300);
        for chunk in [4096, 16384, 65536, 262144] {
            for piece in [1 << 20, 4097, 333] {
                let (pieces, sizes) = encode(&bytes, layout(chunk), piece);
                assert_eq!(regenerate(&pieces, &sizes, chunk as u64), bytes);
                assert_eq!(sizes.pages, 244, "chunk {chunk}: {:?}", sizes.parse);
                assert!(sizes.parse.complete);
                // Literals: headers, zero pages, device state (the repeated page went to a
                // second layer).
                assert!(sizes.literal < 10_000, "{}", sizes.literal);
                assert_eq!(sizes.literal + sizes.pages * 4096, bytes.len() as u64);
            }
        }
    }

    #[test]
    fn unparsed_layout_is_a_plain_stream() {
        let bytes = stream(50);
        let plain = MemoryLayout {
            parse: false,
            ..MemoryLayout::DEFAULT
        };
        let (pieces, sizes) = encode(&bytes, plain, 1000);
        assert_eq!(sizes.pages, 0);
        assert!(pieces.iter().all(|p| matches!(p, Piece::Literal(_))));
        assert_eq!(regenerate(&pieces, &sizes, 16384), bytes);
    }

    proptest! {
        #[test]
        fn prop_damaged_streams_come_back(at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>(), piece in 1usize..9000, chunk_pages in 0u32..7) {
            let mut bytes = stream(40);
            let i = at.index(bytes.len());
            bytes[i] = byte;
            bytes.truncate(cut.index(bytes.len() + 1).max(i));
            let chunk = 4096 << chunk_pages;
            let (pieces, sizes) = encode(&bytes, layout(chunk), piece);
            prop_assert_eq!(regenerate(&pieces, &sizes, chunk as u64), bytes);
        }
    }
}
