use super::*;
use proptest::prelude::*;

/// Builds streams in QEMU's framing (what QEMU 10's background snapshot writes).
pub(crate) struct Builder {
    pub out: Vec<u8>,
    blocks: Vec<(String, u64)>,
    last: Option<usize>,
}

impl Builder {
    pub fn new(blocks: &[(&str, u64)]) -> Builder {
        let mut b = Builder {
            out: Vec::new(),
            blocks: blocks.iter().map(|(n, s)| (n.to_string(), *s)).collect(),
            last: None,
        };
        b.out.extend_from_slice(&QEMU_VM_FILE_MAGIC.to_be_bytes());
        b.out.extend_from_slice(&QEMU_VM_FILE_VERSION.to_be_bytes());
        b.out.push(SECTION_CONFIGURATION);
        b.out.extend_from_slice(&14u32.to_be_bytes());
        b.out.extend_from_slice(b"pc-i440fx-10.0");
        b.section_start(1, "ram", 4);
        let total: u64 = b.blocks.iter().map(|(_, s)| s).sum();
        b.out
            .extend_from_slice(&(total | FLAG_MEM_SIZE).to_be_bytes());
        for (name, size) in b.blocks.clone() {
            b.out.push(name.len() as u8);
            b.out.extend_from_slice(name.as_bytes());
            b.out.extend_from_slice(&size.to_be_bytes());
        }
        b.eos_footer(1);
        b
    }

    pub fn section_start(&mut self, sid: u32, idstr: &str, version: u32) {
        self.section(SECTION_START, sid, idstr, version);
    }

    pub fn section(&mut self, typ: u8, sid: u32, idstr: &str, version: u32) {
        self.out.push(typ);
        self.out.extend_from_slice(&sid.to_be_bytes());
        self.out.push(idstr.len() as u8);
        self.out.extend_from_slice(idstr.as_bytes());
        self.out.extend_from_slice(&0u32.to_be_bytes());
        self.out.extend_from_slice(&version.to_be_bytes());
    }

    pub fn part(&mut self, end: bool) {
        self.out.push(if end { SECTION_END } else { SECTION_PART });
        self.out.extend_from_slice(&1u32.to_be_bytes());
    }

    fn header(&mut self, block: usize, addr: u64, flag: u64) {
        let cont = if self.last == Some(block) {
            FLAG_CONTINUE
        } else {
            0
        };
        self.out
            .extend_from_slice(&(addr | flag | cont).to_be_bytes());
        if cont == 0 {
            let name = self.blocks[block].0.clone();
            self.out.push(name.len() as u8);
            self.out.extend_from_slice(name.as_bytes());
            self.last = Some(block);
        }
    }

    pub fn page(&mut self, block: usize, page: u64, data: &[u8]) {
        assert_eq!(data.len(), 4096);
        self.header(block, page * 4096, FLAG_PAGE);
        self.out.extend_from_slice(data);
    }

    pub fn zero(&mut self, block: usize, page: u64) {
        self.header(block, page * 4096, FLAG_ZERO);
        self.out.push(0);
    }

    pub fn eos_footer(&mut self, sid: u32) {
        self.out.extend_from_slice(&FLAG_EOS.to_be_bytes());
        self.out.push(SECTION_FOOTER);
        self.out.extend_from_slice(&sid.to_be_bytes());
    }

    /// Device state, an end marker and a description, as QEMU ends a stream.
    pub fn devices_and_end(&mut self) {
        self.section(SECTION_FULL, 2, "timer", 2);
        self.out
            .extend_from_slice(&[0, 0, 0, 7, 0x7f, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 2]);
        self.out.push(SECTION_FOOTER);
        self.out.extend_from_slice(&2u32.to_be_bytes());
        self.out.push(SECTION_EOF);
        self.out.push(0x06);
        let json = br#"{"page_size":4096,"devices":[{"name":"timer"}]}"#;
        self.out
            .extend_from_slice(&(json.len() as u32).to_be_bytes());
        self.out.extend_from_slice(json);
    }
}

pub(crate) fn page(tag: u64) -> Vec<u8> {
    let mut p = vec![0u8; 4096];
    for (i, b) in p.iter_mut().enumerate() {
        *b = (tag.wrapping_mul(31).wrapping_add(i as u64 / 7)) as u8 | 1;
    }
    p
}

#[derive(Debug, PartialEq, Eq, Clone)]
enum Event {
    Literal(Vec<u8>),
    Blocks(Vec<RamBlock>),
    Page(usize, u64, Vec<u8>),
    Zero(usize, u64),
}

#[derive(Default)]
struct Recorder(Vec<Event>);

impl RecordSink for Recorder {
    fn literal(&mut self, bytes: &[u8]) {
        assert!(!bytes.is_empty());
        if let Some(Event::Literal(l)) = self.0.last_mut() {
            l.extend_from_slice(bytes);
        } else {
            self.0.push(Event::Literal(bytes.to_vec()));
        }
    }
    fn blocks(&mut self, blocks: &[RamBlock]) {
        self.0.push(Event::Blocks(blocks.to_vec()));
    }
    fn page(&mut self, block: usize, page: u64, data: &[u8]) {
        self.0.push(Event::Page(block, page, data.to_vec()));
    }
    fn zero_page(&mut self, block: usize, page: u64) {
        self.0.push(Event::Zero(block, page));
    }
}

fn parse(bytes: &[u8], pieces: &[usize]) -> (Vec<Event>, ParseReport) {
    let mut p = QemuParser::new();
    let mut r = Recorder::default();
    let mut rest = bytes;
    let mut sizes = pieces.iter().cycle();
    while !rest.is_empty() {
        let n = (*sizes.next().unwrap_or(&usize::MAX)).clamp(1, rest.len());
        p.push(&rest[..n], &mut r);
        rest = &rest[n..];
    }
    let report = p.finish(&mut r);
    (r.0, report)
}

/// The bytes the events stand for, in order.
fn rebuild(events: &[Event]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        match e {
            Event::Literal(b) | Event::Page(_, _, b) => out.extend_from_slice(b),
            _ => {}
        }
    }
    out
}

fn pages_of(events: &[Event]) -> Vec<(usize, u64)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Page(b, p, _) => Some((*b, *p)),
            _ => None,
        })
        .collect()
}

fn sample() -> (Vec<u8>, Vec<(usize, u64)>) {
    let mut b = Builder::new(&[("pc.ram", 64 * 4096), ("/rom@etc/acpi/tables", 8192)]);
    let mut pages = Vec::new();
    b.part(false);
    for p in 0..10 {
        if p % 3 == 0 {
            b.zero(0, p);
        } else {
            b.page(0, p, &page(p));
            pages.push((0, p));
        }
    }
    // A page ahead of the scan (the guest wrote it during the capture), another block.
    b.page(0, 40, &page(40));
    pages.push((0, 40));
    b.page(1, 1, &page(99));
    pages.push((1, 1));
    b.eos_footer(1);
    b.part(true);
    for p in 10..20 {
        b.page(0, p, &page(p));
        pages.push((0, p));
    }
    b.eos_footer(1);
    b.devices_and_end();
    (b.out, pages)
}

#[test]
fn parses_a_background_snapshot_stream() {
    let (bytes, want) = sample();
    for pieces in [&[usize::MAX][..], &[1], &[4095], &[4097, 3], &[13, 100_000]] {
        let (events, report) = parse(&bytes, pieces);
        assert_eq!(rebuild(&events), bytes, "pieces {pieces:?}");
        assert_eq!(pages_of(&events), want);
        assert_eq!(
            events
                .iter()
                .find_map(|e| match e {
                    Event::Blocks(b) => Some(b.clone()),
                    _ => None,
                })
                .unwrap(),
            [
                RamBlock {
                    name: "pc.ram".into(),
                    size: 64 * 4096
                },
                RamBlock {
                    name: "/rom@etc/acpi/tables".into(),
                    size: 8192
                }
            ]
        );
        assert!(events.contains(&Event::Zero(0, 9)));
        assert_eq!(report.pages, want.len() as u64);
        assert_eq!(report.zero_pages, 4);
        assert_eq!(report.fallback, None);
        assert_eq!(report.resyncs, 0);
        assert!(report.complete);
    }
}

#[test]
fn cut_streams_come_back_whole() {
    let (bytes, want) = sample();
    for cut in 0..bytes.len() {
        let (events, report) = parse(&bytes[..cut], &[1000]);
        assert_eq!(rebuild(&events), &bytes[..cut], "cut at {cut}");
        let got = pages_of(&events);
        assert!(want.starts_with(&got), "cut at {cut}");
        if cut < bytes.len() - 200 {
            assert!(!report.complete);
        }
    }
}

#[test]
fn unknown_sections_between_ram_parts_are_skipped() {
    let mut b = Builder::new(&[("pc.ram", 16 * 4096)]);
    b.part(false);
    b.page(0, 0, &page(0));
    b.eos_footer(1);
    // An iterable device the parser does not know, with state of no declared length.
    b.section_start(5, "dirty-bitmap", 1);
    b.out.extend_from_slice(&[9; 300]);
    b.out.push(SECTION_FOOTER);
    b.out.extend_from_slice(&5u32.to_be_bytes());
    b.part(true);
    b.page(0, 1, &page(1));
    b.page(0, 2, &page(2));
    b.eos_footer(1);
    b.devices_and_end();
    let (events, report) = parse(&b.out, &[7]);
    assert_eq!(rebuild(&events), b.out);
    assert_eq!(pages_of(&events), [(0, 0), (0, 1), (0, 2)]);
    assert_eq!(report.resyncs, 1);
    let (at, why) = report.fallback.unwrap();
    assert!(why.contains("dirty-bitmap"), "{why}");
    assert!(at > 4096);
    assert!(report.complete);
}

#[test]
fn a_foreign_stream_is_all_literal() {
    let bytes: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (events, report) = parse(&bytes, &[333]);
    assert_eq!(events, [Event::Literal(bytes.clone())]);
    assert!(report.fallback.unwrap().1.contains("magic"));
    assert_eq!(report.pages, 0);
    // Even when it contains a RAM section start after garbage, it still comes back whole.
    let (sample, _) = sample();
    let mut odd = b"garbage first".to_vec();
    odd.extend_from_slice(&sample[8..]);
    let (events, report) = parse(&odd, &[4096]);
    assert_eq!(rebuild(&events), odd);
    assert_eq!(report.resyncs, 1);
    assert!(report.pages > 0);
}

#[test]
fn bad_ram_setups_fall_back() {
    let (good, _) = sample();
    let setup = good.windows(4).position(|w| w == b"\x03ram").unwrap() + 12;
    // total | MEM_SIZE is at `setup`; the first block entry follows.
    for (at, byte) in [
        (setup + 7, 0x05u8), // flags: not MEM_SIZE
        (setup + 8, 0),      // empty block name
        (setup + 9, b'x'),   // a name that pages will not use: pages fall back later
        (setup + 16, 0xff),  // a block larger than the total
        (setup + 22, 1),     // size not a multiple of the page size
    ] {
        let mut bad = good.clone();
        bad[at] = byte;
        let (events, report) = parse(&bad, &[100]);
        assert_eq!(rebuild(&events), bad, "byte {at}");
        assert!(report.fallback.is_some(), "byte {at}");
    }
}

proptest! {
    #[test]
    fn prop_any_bytes_come_back(bytes in proptest::collection::vec(any::<u8>(), 0..3000), pieces in proptest::collection::vec(1usize..700, 1..5)) {
        let (events, _) = parse(&bytes, &pieces);
        prop_assert_eq!(rebuild(&events), bytes);
    }

    #[test]
    fn prop_damaged_streams_come_back(at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>(), pieces in proptest::collection::vec(1usize..5000, 1..4)) {
        let (mut bytes, _) = sample();
        let i = at.index(bytes.len());
        bytes[i] = byte;
        bytes.truncate(cut.index(bytes.len() + 1).max(i));
        let (events, report) = parse(&bytes, &pieces);
        prop_assert_eq!(rebuild(&events), bytes);
        for e in &events {
            if let Event::Page(b, p, d) = e {
                prop_assert_eq!(d.len(), 4096);
                prop_assert!(*b < 2 && *p < 64);
            }
        }
        prop_assert!(report.pages <= 30);
    }
}
