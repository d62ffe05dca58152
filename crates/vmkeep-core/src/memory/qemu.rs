//! A push parser of QEMU's migration stream framing (savevm.c sections, ram.c page records),
//! just enough to find RAM pages. It never fails: what it does not recognise it passes on as
//! literal bytes, and it keeps looking for the next RAM section part it can recognise.
//!
//! What it recognises (QEMU 2.x to 10.x, precopy and background-snapshot, multifd, mapped-ram,
//! xbzrle and postcopy off, 4 KiB target pages):
//!
//! ```text
//! stream   = be32 magic "QEVM" || be32 version 3 || section*
//! section  = 0x07 be32 n name[n]                                  configuration (machine type)
//!          | (0x01 START | 0x04 FULL) be32 id u8 n idstr[n] be32 instance be32 version payload footer?
//!          | (0x02 PART | 0x03 END) be32 id payload footer?
//!          | 0x00 EOF (then the JSON device description: literal to the end)
//! footer   = 0x7e be32 id
//! RAM payload of START "ram" (version 4): be64 (total | MEM_SIZE 0x04) || (u8 n idstr[n] be64 size)* until the sizes add up to total, then records
//! records  = (be64 (offset | flags) [u8 n idstr[n] unless flags has CONTINUE 0x20] (ZERO 0x02: u8 | PAGE 0x08: 4096 bytes))* be64 EOS 0x10
//! ```
//!
//! Device state (FULL sections, other iterable sections) has no length field: it stays
//! literal, and the parser scans for the next `PART`/`END` of the RAM section followed by a
//! valid record header (or, before the RAM section was found, for its `START`). A false match
//! costs nothing but deduplication: every byte is still either a literal or a page copied
//! from the exact bytes it was taken from.
use super::PAGE_SIZE;

pub const QEMU_VM_FILE_MAGIC: u32 = 0x5145_564d;
pub const QEMU_VM_FILE_VERSION: u32 = 3;

const SECTION_EOF: u8 = 0x00;
const SECTION_START: u8 = 0x01;
const SECTION_PART: u8 = 0x02;
const SECTION_END: u8 = 0x03;
const SECTION_FULL: u8 = 0x04;
const SECTION_CONFIGURATION: u8 = 0x07;
const SECTION_FOOTER: u8 = 0x7e;

const FLAG_ZERO: u64 = 0x02;
const FLAG_MEM_SIZE: u64 = 0x04;
const FLAG_PAGE: u64 = 0x08;
const FLAG_EOS: u64 = 0x10;
const FLAG_CONTINUE: u64 = 0x20;
const FLAG_MASK: u64 = PAGE_SIZE as u64 - 1;

/// The version of the "ram" section's payload this parser knows.
const RAM_SECTION_VERSION: u32 = 4;
/// At most this many RAM blocks (a VM has a handful to a few dozen).
pub const MAX_BLOCKS: usize = 1024;
/// Longest machine type name accepted in the configuration section.
const MAX_CONFIG_NAME: usize = 256;
/// Bytes fed to one parsing round: bounds the parser's buffer.
const PIECE: usize = 64 << 10;

/// One RAM block as the stream's RAM setup lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamBlock {
    /// QEMU's idstr, e.g. `pc.ram` or `/rom@etc/acpi/tables` (1-255 bytes of UTF-8).
    pub name: String,
    /// Bytes (a multiple of the page size).
    pub size: u64,
}

/// Receives the parsed stream, in stream order. Every input byte reaches exactly one of
/// `literal` and `page`; `blocks` and `zero_page` only inform.
pub trait RecordSink {
    fn literal(&mut self, bytes: &[u8]);
    /// The RAM blocks, once, before any page.
    fn blocks(&mut self, blocks: &[RamBlock]);
    /// The payload (one page) of a page record for page `page` of block `block`; its header
    /// went to `literal` just before.
    fn page(&mut self, block: usize, page: u64, data: &[u8]);
    /// A zero-page record for page `page` of block `block` (its bytes went to `literal`).
    fn zero_page(&mut self, block: usize, page: u64);
}

/// What the parser made of a stream, for logs and statistics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParseReport {
    pub pages: u64,
    pub zero_pages: u64,
    /// The first place the parser did not understand: (stream offset, why).
    pub fallback: Option<(u64, String)>,
    /// Times it found a RAM section again after a fallback.
    pub resyncs: u64,
    /// The RAM section's last part was parsed to its end (the stream was not cut inside RAM).
    pub complete: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Header,
    SectionType,
    ConfigLen,
    ConfigName {
        len: usize,
    },
    SectionId {
        typ: u8,
    },
    SectionIdstr {
        typ: u8,
        sid: u32,
        len: usize,
    },
    MemSize,
    BlockLen,
    BlockEntry {
        len: usize,
    },
    Record,
    RecordIdstrLen {
        flags: u64,
        addr: u64,
    },
    RecordIdstr {
        flags: u64,
        addr: u64,
        len: usize,
    },
    ZeroByte {
        block: usize,
        page: u64,
    },
    PagePayload {
        block: usize,
        page: u64,
    },
    AfterEos,
    Footer,
    /// Not understood: literal bytes, scanning for a RAM section to resume at.
    Opaque,
    /// Past the RAM section for good (device state, the description): literal to the end.
    Tail,
}

/// Result of checking for a resumable RAM section at a position.
enum Check {
    Yes,
    No,
    More,
}

pub struct QemuParser {
    state: State,
    /// Unparsed input; `pos` is the next byte to parse, `lit` the first byte not yet given to
    /// the sink (bytes in `lit..pos` are literals).
    buf: Vec<u8>,
    pos: usize,
    lit: usize,
    /// Stream offset of `buf[0]`.
    base: u64,
    ram_section: Option<u32>,
    /// The RAM section's END part is being parsed / was finished.
    in_end: bool,
    ram_done: bool,
    blocks: Vec<RamBlock>,
    mem_total: u64,
    mem_listed: u64,
    current_block: Option<usize>,
    report: ParseReport,
}

impl Default for QemuParser {
    fn default() -> Self {
        Self::new()
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

impl QemuParser {
    pub fn new() -> QemuParser {
        QemuParser {
            state: State::Header,
            buf: Vec::with_capacity(PIECE + 2 * PAGE_SIZE as usize),
            pos: 0,
            lit: 0,
            base: 0,
            ram_section: None,
            in_end: false,
            ram_done: false,
            blocks: Vec::new(),
            mem_total: 0,
            mem_listed: 0,
            current_block: None,
            report: ParseReport::default(),
        }
    }

    pub fn report(&self) -> &ParseReport {
        &self.report
    }

    /// The RAM blocks found so far (empty until the RAM setup was parsed).
    pub fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    /// Feed the next bytes of the stream.
    pub fn push(&mut self, data: &[u8], sink: &mut dyn RecordSink) {
        for piece in data.chunks(PIECE) {
            self.buf.extend_from_slice(piece);
            self.run(sink);
            self.compact();
        }
    }

    /// End of the stream: whatever is left (a cut record, the scan's lookahead) is literal.
    pub fn finish(mut self, sink: &mut dyn RecordSink) -> ParseReport {
        if self.lit < self.buf.len() {
            sink.literal(&self.buf[self.lit..]);
        }
        self.report.complete = self.ram_done;
        self.report
    }

    fn compact(&mut self) {
        debug_assert_eq!(self.lit, self.pos, "literals are flushed after each round");
        self.buf.drain(..self.pos);
        self.base += self.pos as u64;
        self.pos = 0;
        self.lit = 0;
    }

    fn flush_literal(&mut self, sink: &mut dyn RecordSink) {
        if self.lit < self.pos {
            sink.literal(&self.buf[self.lit..self.pos]);
            self.lit = self.pos;
        }
    }

    fn run(&mut self, sink: &mut dyn RecordSink) {
        loop {
            match self.state {
                State::Tail => {
                    self.pos = self.buf.len();
                    break;
                }
                State::Opaque => {
                    let (advance, found) = self.scan(self.pos);
                    self.pos = advance;
                    if !found {
                        break;
                    }
                    self.report.resyncs += 1;
                    self.state = State::SectionType;
                    continue;
                }
                State::Record => self.continued_records(sink),
                _ => {}
            }
            let need = self.need();
            if self.buf.len() - self.pos < need {
                break;
            }
            let start = self.pos;
            self.pos += need;
            self.element(start, sink);
        }
        self.flush_literal(sink);
    }

    /// The hot path: page and zero-page records that continue the current block, whole in
    /// the buffer, taken in a tight loop. Exactly what the element-by-element path does with
    /// them; anything else is left to it.
    fn continued_records(&mut self, sink: &mut dyn RecordSink) {
        let Some(block) = self.current_block else {
            return;
        };
        let size = self.blocks[block].size;
        let page_len = PAGE_SIZE as usize;
        loop {
            let rest = &self.buf[self.pos..];
            if rest.len() < 9 {
                return;
            }
            let h = be64(rest);
            let (flags, addr) = (h & FLAG_MASK, h & !FLAG_MASK);
            if addr >= size {
                return;
            }
            let page = addr / PAGE_SIZE as u64;
            if flags == FLAG_ZERO | FLAG_CONTINUE {
                self.pos += 9;
                self.report.zero_pages += 1;
                sink.zero_page(block, page);
            } else if flags == FLAG_PAGE | FLAG_CONTINUE && rest.len() >= 8 + page_len {
                self.pos += 8;
                self.flush_literal(sink);
                let start = self.pos;
                self.pos += page_len;
                self.lit = self.pos;
                self.report.pages += 1;
                sink.page(block, page, &self.buf[start..self.pos]);
            } else {
                return;
            }
        }
    }

    fn need(&self) -> usize {
        match self.state {
            State::Header => 8,
            State::SectionType | State::AfterEos => 1,
            State::ConfigLen => 4,
            State::ConfigName { len } => len,
            State::SectionId { typ } => {
                if typ == SECTION_START || typ == SECTION_FULL {
                    5
                } else {
                    4
                }
            }
            State::SectionIdstr { len, .. } => len + 8,
            State::MemSize | State::Record => 8,
            State::BlockLen => 1,
            State::BlockEntry { len } => len + 8,
            State::RecordIdstrLen { .. } => 1,
            State::RecordIdstr { len, .. } => len,
            State::ZeroByte { .. } => 1,
            State::PagePayload { .. } => PAGE_SIZE as usize,
            State::Footer => 4,
            State::Opaque | State::Tail => unreachable!("no elements in these states"),
        }
    }

    /// Gives up on the structure at the element starting at `start` (already consumed as
    /// literal). After the RAM section ended nothing more can be recognised.
    fn fall_back(&mut self, start: usize, why: impl FnOnce() -> String) {
        // Device state after the RAM section is expected, not a failure.
        if self.report.fallback.is_none() && !self.ram_done {
            self.report.fallback = Some((self.base + start as u64, why()));
        }
        self.state = if self.ram_done {
            State::Tail
        } else {
            State::Opaque
        };
    }

    fn element(&mut self, start: usize, sink: &mut dyn RecordSink) {
        let end = self.pos;
        match self.state {
            State::Header => {
                let el = &self.buf[start..end];
                if be32(el) == QEMU_VM_FILE_MAGIC && be32(&el[4..]) == QEMU_VM_FILE_VERSION {
                    self.state = State::SectionType;
                } else {
                    self.fall_back(start, || "not a QEMU migration stream (magic)".into());
                }
            }
            State::SectionType | State::AfterEos => {
                let b = self.buf[start];
                if self.state == State::AfterEos && b == SECTION_FOOTER {
                    self.state = State::Footer;
                } else {
                    self.section_type(start, b);
                }
            }
            State::ConfigLen => {
                let len = be32(&self.buf[start..end]) as usize;
                if len <= MAX_CONFIG_NAME {
                    self.state = State::ConfigName { len };
                } else {
                    self.fall_back(start, || format!("configuration name of {len} bytes"));
                }
            }
            State::ConfigName { .. } => self.state = State::SectionType,
            State::SectionId { typ } => {
                let sid = be32(&self.buf[start..end]);
                if typ == SECTION_START || typ == SECTION_FULL {
                    let len = self.buf[start + 4] as usize;
                    self.state = State::SectionIdstr { typ, sid, len };
                } else if Some(sid) == self.ram_section && !self.ram_done {
                    self.in_end = typ == SECTION_END;
                    self.state = State::Record;
                } else {
                    self.fall_back(start, || format!("section {sid} is not the RAM section"));
                }
            }
            State::SectionIdstr { typ, sid, len } => {
                let el = &self.buf[start..end];
                let is_ram = &el[..len] == b"ram";
                let (instance, version) = (be32(&el[len..]), be32(&el[len + 4..]));
                if typ == SECTION_START
                    && is_ram
                    && instance == 0
                    && version == RAM_SECTION_VERSION
                    && self.ram_section.is_none()
                {
                    self.ram_section = Some(sid);
                    self.state = State::MemSize;
                } else {
                    let name = String::from_utf8_lossy(&el[..len]).into_owned();
                    self.fall_back(start, || {
                        format!("section {name:?} version {version} (state without a length)")
                    });
                }
            }
            State::MemSize => {
                let h = be64(&self.buf[start..end]);
                if h & FLAG_MASK == FLAG_MEM_SIZE && h & !FLAG_MASK != 0 {
                    self.mem_total = h & !FLAG_MASK;
                    self.state = State::BlockLen;
                } else {
                    self.fall_back(start, || format!("RAM setup header {h:#x}"));
                }
            }
            State::BlockLen => {
                let len = self.buf[start] as usize;
                if len > 0 {
                    self.state = State::BlockEntry { len };
                } else {
                    self.fall_back(start, || "RAM block with an empty name".into());
                }
            }
            State::BlockEntry { len } => self.block_entry(start, len, sink),
            State::Record => self.record(start),
            State::RecordIdstrLen { flags, addr } => {
                let len = self.buf[start] as usize;
                if len > 0 {
                    self.state = State::RecordIdstr { flags, addr, len };
                } else {
                    self.fall_back(start, || "page record with an empty block name".into());
                }
            }
            State::RecordIdstr { flags, addr, .. } => {
                let name = &self.buf[start..end];
                match self.blocks.iter().position(|b| b.name.as_bytes() == name) {
                    Some(block) => {
                        self.current_block = Some(block);
                        self.page_record(start, flags, block, addr);
                    }
                    None => {
                        let name = String::from_utf8_lossy(name).into_owned();
                        self.fall_back(start, || format!("page of unknown RAM block {name:?}"));
                    }
                }
            }
            State::ZeroByte { block, page } => {
                self.report.zero_pages += 1;
                sink.zero_page(block, page);
                self.state = State::Record;
            }
            State::PagePayload { block, page } => {
                self.pos = start;
                self.flush_literal(sink);
                self.pos = end;
                self.lit = end;
                self.report.pages += 1;
                sink.page(block, page, &self.buf[start..end]);
                self.state = State::Record;
            }
            State::Footer => {
                let sid = be32(&self.buf[start..end]);
                if Some(sid) == self.ram_section {
                    self.state = State::SectionType;
                } else {
                    self.fall_back(start, || format!("footer of section {sid} in RAM"));
                }
            }
            State::Opaque | State::Tail => unreachable!("no elements in these states"),
        }
    }

    fn section_type(&mut self, start: usize, b: u8) {
        match b {
            SECTION_CONFIGURATION => self.state = State::ConfigLen,
            SECTION_START | SECTION_FULL | SECTION_PART | SECTION_END => {
                // Device state (FULL sections) comes after all RAM: a background snapshot ends
                // its RAM with a PART, not an END.
                if b == SECTION_FULL && self.ram_section.is_some() {
                    self.ram_done = true;
                }
                self.state = State::SectionId { typ: b }
            }
            SECTION_EOF => {
                // The JSON description follows: nothing more to recognise.
                self.state = State::Tail;
            }
            _ => self.fall_back(start, || format!("unknown section type {b:#04x}")),
        }
    }

    fn block_entry(&mut self, start: usize, len: usize, sink: &mut dyn RecordSink) {
        let el = &self.buf[start..self.pos];
        let size = be64(&el[len..]);
        let name = std::str::from_utf8(&el[..len]).map(str::to_string);
        let listed = self.mem_listed.checked_add(size);
        let ok = match (&name, listed) {
            (Ok(n), Some(listed)) => {
                size > 0
                    && size % PAGE_SIZE as u64 == 0
                    && listed <= self.mem_total
                    && self.blocks.len() < MAX_BLOCKS
                    && !self.blocks.iter().any(|b| &b.name == n)
            }
            _ => false,
        };
        if !ok {
            self.fall_back(start, || format!("RAM block entry of size {size:#x}"));
            return;
        }
        self.blocks.push(RamBlock {
            name: name.expect("checked"),
            size,
        });
        self.mem_listed = listed.expect("checked");
        if self.mem_listed == self.mem_total {
            sink.blocks(&self.blocks);
            self.state = State::Record;
        } else {
            self.state = State::BlockLen;
        }
    }

    fn record(&mut self, start: usize) {
        let h = be64(&self.buf[start..self.pos]);
        let (flags, addr) = (h & FLAG_MASK, h & !FLAG_MASK);
        if flags == FLAG_EOS && addr == 0 {
            if self.in_end {
                self.ram_done = true;
            }
            self.state = State::AfterEos;
            return;
        }
        let kind = flags & !FLAG_CONTINUE;
        if kind != FLAG_ZERO && kind != FLAG_PAGE || self.blocks.is_empty() {
            self.fall_back(start, || format!("RAM record flags {flags:#x}"));
            return;
        }
        if flags & FLAG_CONTINUE == 0 {
            self.state = State::RecordIdstrLen { flags, addr };
            return;
        }
        match self.current_block {
            Some(block) => self.page_record(start, flags, block, addr),
            None => self.fall_back(start, || "page record continues no block".into()),
        }
    }

    fn page_record(&mut self, start: usize, flags: u64, block: usize, addr: u64) {
        if addr >= self.blocks[block].size {
            let name = self.blocks[block].name.clone();
            self.fall_back(start, || {
                format!("page {addr:#x} beyond RAM block {name:?}")
            });
            return;
        }
        let page = addr / PAGE_SIZE as u64;
        self.state = if flags & !FLAG_CONTINUE == FLAG_ZERO {
            State::ZeroByte { block, page }
        } else {
            State::PagePayload { block, page }
        };
    }

    /// Looks for a place to resume parsing from `from`. Returns the new position and whether
    /// parsing resumes there (else the position is where undecided lookahead begins).
    fn scan(&self, from: usize) -> (usize, bool) {
        let w = &self.buf[from..];
        let mut i = 0;
        while i < w.len() {
            let b = w[i];
            if (SECTION_START..=SECTION_END).contains(&b) {
                match self.resumable(&w[i..]) {
                    Check::Yes => return (from + i, true),
                    Check::More => return (from + i, false),
                    Check::No => {}
                }
            }
            i += 1;
        }
        (from + i, false)
    }

    /// Does a recognisable RAM section begin (or continue) at the start of `w`?
    fn resumable(&self, w: &[u8]) -> Check {
        let prefix = |want: &[u8], at: usize| -> Check {
            let have = &w[at.min(w.len())..w.len().min(at + want.len())];
            if have != &want[..have.len()] {
                Check::No
            } else if have.len() < want.len() {
                Check::More
            } else {
                Check::Yes
            }
        };
        let Some(sid) = self.ram_section else {
            // START, any section id, "ram", instance 0, version 4.
            return match prefix(&[SECTION_START], 0) {
                Check::Yes => prefix(b"\x03ram\0\0\0\0\0\0\0\x04", 5),
                other => other,
            };
        };
        if !(w[0] == SECTION_PART || w[0] == SECTION_END) {
            return Check::No;
        }
        match prefix(&sid.to_be_bytes(), 1) {
            Check::Yes => {}
            other => return other,
        }
        let Some(h) = w.get(5..13) else {
            return Check::More;
        };
        let h = be64(h);
        let (flags, addr) = (h & FLAG_MASK, h & !FLAG_MASK);
        if flags == FLAG_EOS && addr == 0 {
            return Check::Yes;
        }
        let kind = flags & !FLAG_CONTINUE;
        if kind != FLAG_ZERO && kind != FLAG_PAGE {
            return Check::No;
        }
        let block = if flags & FLAG_CONTINUE != 0 {
            match self.current_block {
                Some(b) => b,
                None => return Check::No,
            }
        } else {
            let Some(&len) = w.get(13) else {
                return Check::More;
            };
            let Some(name) = w.get(14..14 + len as usize) else {
                let have = &w[14..];
                let partial = self
                    .blocks
                    .iter()
                    .any(|b| b.name.len() == len as usize && b.name.as_bytes().starts_with(have));
                return if partial { Check::More } else { Check::No };
            };
            match self.blocks.iter().position(|b| b.name.as_bytes() == name) {
                Some(b) => b,
                None => return Check::No,
            }
        };
        if addr < self.blocks[block].size {
            Check::Yes
        } else {
            Check::No
        }
    }
}

#[cfg(test)]
#[path = "qemu_tests.rs"]
pub(crate) mod tests;
