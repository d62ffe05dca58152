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

/// At most this much memory (in pages: 16 MiB) waits in open chunks.
pub const MAX_HELD_PAGES: usize = 4096;
/// At most this many chunks are open above their image's head (a page held needs at most
/// one; more are chunks of zero pages waiting behind a gap, which then gets closed).
const MAX_OPEN_CHUNKS: usize = MAX_HELD_PAGES;
/// Page images (layers) per RAM block.
pub const MAX_LAYERS: usize = 8;
/// Page images in all.
pub const MAX_IMAGES: usize = 4096;
/// Page buffers kept for reuse.
const SPARE_PAGES: usize = 256;

#[derive(Default)]
struct Open {
    /// Pages seen (bit i = page i of the chunk).
    seen: u64,
    /// Pages with data that came while the chunk was above its image's head, as (bit,
    /// bytes): memory follows the pages held, not the chunks open (pages ahead of QEMU's scan
    /// are one per chunk).
    pages: Vec<(u32, Vec<u8>)>,
    /// The head chunk's bytes: pages that come while it is the head go straight here.
    data: Option<Vec<u8>>,
    /// Memory held, in pages: one per entry of `pages`, the whole chunk for `data`.
    held: usize,
}

struct Image {
    block: u32,
    size: u64,
    /// Chunks below this one are finished.
    next: u64,
    /// Chunk `next` (empty when nothing of it was seen). Kept here rather than in `open`: the
    /// scan fills it page by page, and this is the hot path.
    head: Open,
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
    /// Open chunks above their image's `next` (the chunk `next` is the image's `head`).
    open: BTreeMap<(u32, u64), Open>,
    /// Memory held by open chunks, in pages (see `Open::held`).
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
        let (image, chunk, bit) = self.claim(block, page, true)?;
        if chunk == self.images[image as usize].next {
            // The whole chunk's buffer counts as held from its first page.
            let len = self.chunk_len(image, chunk);
            let head = &mut self.images[image as usize].head;
            if head.data.is_none() {
                head.data = Some(vec![0u8; len]);
                head.held += len / PAGE_SIZE as usize;
                self.held += len / PAGE_SIZE as usize;
            }
            let buf = head.data.as_mut().expect("allocated above");
            let at = bit as usize * PAGE_SIZE as usize;
            buf[at..at + PAGE_SIZE as usize].copy_from_slice(data);
            head.seen |= 1 << bit;
        } else {
            let buf = match self.spare.pop() {
                Some(mut b) => {
                    b.copy_from_slice(data);
                    b
                }
                None => data.to_vec(),
            };
            let open = self.chunk_mut(image, chunk);
            open.pages.push((bit, buf));
            open.seen |= 1 << bit;
            open.held += 1;
            self.held += 1;
        }
        self.placed += 1;
        self.advance(image);
        Some(image)
    }

    /// A zero page: its place is accounted for (it stays a hole).
    pub fn zero_page(&mut self, block: usize, page: u64) {
        if let Some((image, chunk, bit)) = self.claim(block, page, false) {
            self.chunk_mut(image, chunk).seen |= 1 << bit;
            self.advance(image);
        }
    }

    /// What was produced since the last call.
    pub fn take(&mut self) -> Vec<Assembled> {
        std::mem::take(&mut self.out)
    }

    /// [`PageAssembler::take`] into `f`, keeping the buffer (this runs for every page).
    pub fn drain_into(&mut self, f: impl FnMut(Assembled)) {
        if !self.out.is_empty() {
            self.out.drain(..).for_each(f);
        }
    }

    /// End of the stream: every open chunk is finished.
    pub fn finish(&mut self) -> Vec<Assembled> {
        for image in 0..self.images.len() as u32 {
            self.finish_through(image, u64::MAX);
        }
        self.take()
    }

    fn chunk_len(&self, image: u32, chunk: u64) -> usize {
        let size = self.images[image as usize].size;
        (size - chunk * self.chunk_size).min(self.chunk_size) as usize
    }

    /// The open chunk `chunk` of `image` (at or above its `next`), opened if needed.
    fn chunk_mut(&mut self, image: u32, chunk: u64) -> &mut Open {
        let img = &mut self.images[image as usize];
        debug_assert!(chunk >= img.next);
        if chunk == img.next {
            &mut img.head
        } else {
            self.open.entry((image, chunk)).or_default()
        }
    }

    /// Pages of `chunk` of `image` seen so far (0 when not open; None when finished).
    fn seen(&self, image: u32, chunk: u64) -> Option<u64> {
        let img = &self.images[image as usize];
        match chunk.cmp(&img.next) {
            std::cmp::Ordering::Less => None,
            std::cmp::Ordering::Equal => Some(img.head.seen),
            std::cmp::Ordering::Greater => {
                Some(self.open.get(&(image, chunk)).map_or(0, |o| o.seen))
            }
        }
    }

    /// Where page `page` of `block` goes: (image, chunk, bit). The first layer of the block
    /// whose chunk is not finished and lacks the page; else a new layer. With `data`, room for
    /// one more held page is made first. None: the page stays a literal.
    fn claim(&mut self, block: usize, page: u64, data: bool) -> Option<(u32, u64, u32)> {
        let size = self.blocks.get(block)?.size;
        if page >= size / PAGE_SIZE as u64 {
            return None;
        }
        let chunk = page / self.pages_per_chunk;
        let bit = (page % self.pages_per_chunk) as u32;
        let fits = |me: &Self, i: u32| me.seen(i, chunk).is_some_and(|s| s & (1 << bit) == 0);
        let image = match self.layers[block].iter().copied().find(|&i| fits(self, i)) {
            Some(i) => i,
            None => self.new_layer(block)?,
        };
        // Over a budget: finish the lowest chunks (holding data, for the page budget) until
        // there is room; the page's own chunk may go, and then the page stays a literal.
        while data && self.held >= MAX_HELD_PAGES {
            self.force_lowest_with_data();
        }
        if chunk > self.images[image as usize].next
            && self.open.len() >= MAX_OPEN_CHUNKS
            && !self.open.contains_key(&(image, chunk))
        {
            let (i, c) = *self.open.keys().next().expect("not empty");
            self.finish_through(i, c);
        }
        if !fits(self, image) {
            return None;
        }
        Some((image, chunk, bit))
    }

    fn new_layer(&mut self, block: usize) -> Option<u32> {
        if self.layers[block].len() >= MAX_LAYERS || self.images.len() >= MAX_IMAGES {
            return None;
        }
        let image = self.images.len() as u32;
        self.images.push(Image {
            block: block as u32,
            size: self.blocks[block].size,
            next: 0,
            head: Open::default(),
        });
        self.layers[block].push(image);
        self.out.push(Assembled::NewImage {
            image,
            block: block as u32,
        });
        Some(image)
    }

    /// Finishes the lowest chunk holding pages (with every open chunk below it in its image).
    fn force_lowest_with_data(&mut self) {
        for i in 0..self.images.len() {
            let img = &self.images[i];
            let target = if img.head.held > 0 {
                Some(img.next)
            } else {
                self.open
                    .range((i as u32, 0)..=(i as u32, u64::MAX))
                    .find(|(_, o)| o.held > 0)
                    .map(|(&(_, c), _)| c)
            };
            if let Some(c) = target {
                self.finish_through(i as u32, c);
                self.advance(i as u32);
                return;
            }
        }
        unreachable!("pages are held");
    }

    /// Finish the complete chunks of `image` that follow its finished ones without a gap. (A
    /// chunk after a gap waits: the gap's pages may still come, or the budget forces it out.)
    fn advance(&mut self, image: u32) {
        loop {
            let img = &self.images[image as usize];
            if img.next.saturating_mul(self.chunk_size) >= img.size {
                return;
            }
            let pages = self.chunk_len(image, img.next) as u64 / PAGE_SIZE as u64;
            let full = if pages == 64 {
                u64::MAX
            } else {
                (1u64 << pages) - 1
            };
            if img.head.seen != full {
                return;
            }
            self.finish_head(image);
        }
    }

    /// Finishes every open chunk of `image` up to `chunk`, in order.
    fn finish_through(&mut self, image: u32, chunk: u64) {
        loop {
            let img = &self.images[image as usize];
            if img.next > chunk || img.next.saturating_mul(self.chunk_size) >= img.size {
                return;
            }
            // Jump over chunks nothing was seen of, to the next open one (or past `chunk`).
            if img.head.seen == 0 {
                let next_open = self
                    .open
                    .range((image, img.next)..=(image, chunk))
                    .next()
                    .map(|(&(_, c), _)| c);
                match next_open {
                    Some(c) => {
                        let o = self.open.remove(&(image, c)).expect("present");
                        let img = &mut self.images[image as usize];
                        img.next = c;
                        img.head = o;
                    }
                    None => {
                        let img = &mut self.images[image as usize];
                        img.next = chunk.saturating_add(1);
                        if let Some(o) = self.open.remove(&(image, img.next)) {
                            img.head = o;
                        }
                        return;
                    }
                }
            }
            self.finish_head(image);
        }
    }

    /// Emits the head chunk (when it holds pages) and makes the next chunk the head.
    fn finish_head(&mut self, image: u32) {
        let img = &mut self.images[image as usize];
        let head = std::mem::take(&mut img.head);
        let chunk = img.next;
        img.next += 1;
        if let Some(o) = self.open.remove(&(image, chunk + 1)) {
            self.images[image as usize].head = o;
        }
        if head.held == 0 {
            return;
        }
        self.held -= head.held;
        let mut data = head
            .data
            .unwrap_or_else(|| vec![0u8; self.chunk_len(image, chunk)]);
        for (bit, page) in head.pages {
            let at = bit as usize * PAGE_SIZE as usize;
            data[at..at + PAGE_SIZE as usize].copy_from_slice(&page);
            if self.spare.len() < SPARE_PAGES {
                self.spare.push(page);
            }
        }
        self.out.push(Assembled::Chunk { image, chunk, data });
    }

    /// The RAM block of page image `image`.
    pub fn block_of(&self, image: u32) -> &RamBlock {
        &self.blocks[self.images[image as usize].block as usize]
    }
}

#[cfg(test)]
#[path = "assemble_tests.rs"]
mod tests;
