//! Page images in fixed chunks, from pages arriving in any order, in bounded memory.
//!
//! The index tree builder takes a chunk only after every lower chunk of its image, so the
//! assembler finishes the chunks of an image in ascending order: a chunk is finished when it
//! is complete (every page seen, as a page or a zero page) and every chunk below it is
//! finished, or when the pages held exceed [`MAX_HELD_PAGES`] (then the lowest chunk holding
//! pages goes first, its missing pages zero, with every open chunk below it).
//!
//! QEMU does not send a RAM block in one ascending pass: a background snapshot continues its
//! scan from wherever the guest last faulted a page and wraps around at the block's end, and
//! precopy sends pages again. A page that belongs below an image's finished chunks therefore
//! goes to another **layer** of the same RAM block: a second page image with its own tree
//! (only the chunks it holds are non-zero). A RAM block has at most [`MAX_LAYERS`]; a page that
//! fits none stays a literal (the caller keeps it in the literal stream). Chunks of a layer
//! that cover the same pages as another capture's have the same ids, so layers deduplicate
//! chunk by chunk (and whole tree leaves) across captures whose scans jumped elsewhere.
use std::collections::BTreeMap;

use super::qemu::RamBlock;
use super::PAGE_SIZE;

/// At most this many pages (16 MiB) wait for their chunk to finish.
pub const MAX_HELD_PAGES: usize = 4096;
/// At most this many chunks are open (mostly chunks of zero pages, which hold no data).
const MAX_OPEN_CHUNKS: usize = 65536;
/// Page images (layers) per RAM block.
pub const MAX_LAYERS: usize = 8;
/// Page images in all.
pub const MAX_IMAGES: usize = 4096;
/// Page buffers kept for reuse.
const SPARE_PAGES: usize = 256;

struct Open {
    /// Pages seen (bit i = page i of the chunk).
    seen: u64,
    /// The pages with data, as (bit, bytes): memory follows the pages held, not the chunks
    /// open (pages ahead of QEMU's scan are one per chunk).
    pages: Vec<(u32, Vec<u8>)>,
}

struct Image {
    block: u32,
    size: u64,
    /// Chunks below this one are finished.
    next: u64,
}

/// What the assembler produced, in an order the tree builders can follow.
#[derive(Debug, PartialEq, Eq)]
pub enum Assembled {
    /// Page image `image` (the next number) holds pages of RAM block `block`.
    NewImage { image: u32, block: u32 },
    /// A finished chunk with data (chunks of zero pages only are not emitted).
    Chunk {
        image: u32,
        chunk: u64,
        data: Vec<u8>,
    },
}

pub struct PageAssembler {
    chunk_size: u64,
    pages_per_chunk: u64,
    blocks: Vec<RamBlock>,
    /// Per RAM block, its page images (layers) in creation order.
    layers: Vec<Vec<u32>>,
    images: Vec<Image>,
    open: BTreeMap<(u32, u64), Open>,
    /// Pages held in `open`.
    held: usize,
    /// Page buffers to reuse.
    spare: Vec<Vec<u8>>,
    out: Vec<Assembled>,
    /// Pages placed into images.
    placed: u64,
}

impl PageAssembler {
    /// `chunk_size`: a valid page image chunk size ([`super::validate_image_chunk_size`]).
    pub fn new(chunk_size: u32) -> PageAssembler {
        super::validate_image_chunk_size(chunk_size).expect("a valid page image chunk size");
        PageAssembler {
            chunk_size: chunk_size as u64,
            pages_per_chunk: (chunk_size / PAGE_SIZE) as u64,
            blocks: Vec::new(),
            layers: Vec::new(),
            images: Vec::new(),
            open: BTreeMap::new(),
            held: 0,
            spare: Vec::new(),
            out: Vec::new(),
            placed: 0,
        }
    }

    pub fn set_blocks(&mut self, blocks: &[RamBlock]) {
        debug_assert!(self.blocks.is_empty());
        self.blocks = blocks.to_vec();
        self.layers = vec![Vec::new(); blocks.len()];
    }

    pub fn placed_pages(&self) -> u64 {
        self.placed
    }

    /// Place a page; returns the page image it went to, None when it must stay a literal.
    pub fn page(&mut self, block: usize, page: u64, data: &[u8]) -> Option<u32> {
        debug_assert_eq!(data.len(), PAGE_SIZE as usize);
        let ((image, chunk), bit) = self.claim(block, page, true)?;
        let buf = match self.spare.pop() {
            Some(mut b) => {
                b.copy_from_slice(data);
                b
            }
            None => data.to_vec(),
        };
        let open = self.open.get_mut(&(image, chunk)).expect("claimed");
        open.pages.push((bit, buf));
        open.seen |= 1 << bit;
        self.held += 1;
        self.placed += 1;
        self.advance(image);
        Some(image)
    }

    /// A zero page: its place is accounted for (it stays a hole).
    pub fn zero_page(&mut self, block: usize, page: u64) {
        if let Some((key, bit)) = self.claim(block, page, false) {
            self.open.get_mut(&key).expect("claimed").seen |= 1 << bit;
            self.advance(key.0);
        }
    }

    /// What was produced since the last call.
    pub fn take(&mut self) -> Vec<Assembled> {
        std::mem::take(&mut self.out)
    }

    /// End of the stream: every open chunk is finished.
    pub fn finish(&mut self) -> Vec<Assembled> {
        while let Some((&key, _)) = self.open.iter().next() {
            self.finish_chunk(key);
        }
        self.take()
    }

    fn chunk_len(&self, (image, chunk): (u32, u64)) -> usize {
        let size = self.images[image as usize].size;
        (size - chunk * self.chunk_size).min(self.chunk_size) as usize
    }

    /// The open chunk of the page image where page `page` of `block` goes, opening it (and
    /// the image) if needed, and the page's bit. With `data`, room for one more held page is
    /// made first. None: the page stays a literal.
    fn claim(&mut self, block: usize, page: u64, data: bool) -> Option<((u32, u64), u32)> {
        let size = self.blocks.get(block)?.size;
        if page >= size / PAGE_SIZE as u64 {
            return None;
        }
        let chunk = page / self.pages_per_chunk;
        let bit = (page % self.pages_per_chunk) as u32;
        let image = self.layer_for(block, chunk, bit)?;
        // Over a budget: finish the lowest chunks (holding data, for the page budget) until
        // there is room; the page's own chunk may go, and then the page stays a literal.
        while data && self.held >= MAX_HELD_PAGES {
            let lowest = *self
                .open
                .iter()
                .find(|(_, o)| !o.pages.is_empty())
                .expect("pages are held")
                .0;
            self.finish_chunk(lowest);
            self.advance(lowest.0);
        }
        let key = (image, chunk);
        if !self.open.contains_key(&key) && self.open.len() >= MAX_OPEN_CHUNKS {
            let lowest = *self.open.keys().next().expect("not empty");
            self.finish_chunk(lowest);
            self.advance(lowest.0);
        }
        if chunk < self.images[image as usize].next {
            return None;
        }
        let open = self.open.entry(key).or_insert_with(|| Open {
            seen: 0,
            pages: Vec::new(),
        });
        if open.seen & (1 << bit) != 0 {
            return None;
        }
        Some((key, bit))
    }

    /// The layer of `block` for page `bit` of chunk `chunk`: one whose open chunk lacks the
    /// page, else one that has not finished past the chunk, else a new one.
    fn layer_for(&mut self, block: usize, chunk: u64, bit: u32) -> Option<u32> {
        let layers = &self.layers[block];
        let open_without = layers.iter().find(|&&i| {
            self.open
                .get(&(i, chunk))
                .is_some_and(|o| o.seen & (1 << bit) == 0)
        });
        if let Some(&i) = open_without {
            return Some(i);
        }
        let room = layers.iter().find(|&&i| {
            self.images[i as usize].next <= chunk && !self.open.contains_key(&(i, chunk))
        });
        if let Some(&i) = room {
            return Some(i);
        }
        if layers.len() >= MAX_LAYERS || self.images.len() >= MAX_IMAGES {
            return None;
        }
        let image = self.images.len() as u32;
        self.images.push(Image {
            block: block as u32,
            size: self.blocks[block].size,
            next: 0,
        });
        self.layers[block].push(image);
        self.out.push(Assembled::NewImage {
            image,
            block: block as u32,
        });
        Some(image)
    }

    /// Finish the complete chunks of page image `image` that follow its finished ones without
    /// a gap. (A chunk after a gap waits: the gap's pages may still come, or the budget
    /// forces it out.)
    fn advance(&mut self, image: u32) {
        loop {
            let key = (image, self.images[image as usize].next);
            let Some(open) = self.open.get(&key) else {
                return;
            };
            let pages = self.chunk_len(key) as u64 / PAGE_SIZE as u64;
            let full = if pages == 64 {
                u64::MAX
            } else {
                (1u64 << pages) - 1
            };
            if open.seen != full {
                return;
            }
            self.finish_chunk(key);
        }
    }

    /// Finishes `key` and, first, every open chunk below it in the same image.
    fn finish_chunk(&mut self, key: (u32, u64)) {
        let (image, chunk) = key;
        while let Some((&k, _)) = self.open.range((image, 0)..=(image, chunk)).next() {
            let open = self.open.remove(&k).expect("present");
            self.images[image as usize].next = k.1 + 1;
            if open.pages.is_empty() {
                continue;
            }
            self.held -= open.pages.len();
            let mut data = vec![0u8; self.chunk_len(k)];
            for (bit, page) in open.pages {
                let at = bit as usize * PAGE_SIZE as usize;
                data[at..at + PAGE_SIZE as usize].copy_from_slice(&page);
                if self.spare.len() < SPARE_PAGES {
                    self.spare.push(page);
                }
            }
            self.out.push(Assembled::Chunk {
                image,
                chunk: k.1,
                data,
            });
        }
    }

    /// The RAM block of page image `image`.
    pub fn block_of(&self, image: u32) -> &RamBlock {
        &self.blocks[self.images[image as usize].block as usize]
    }
}

#[cfg(test)]
#[path = "assemble_tests.rs"]
mod tests;
