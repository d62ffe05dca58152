use super::*;

fn page(tag: u8) -> Vec<u8> {
    vec![tag; PAGE_SIZE as usize]
}

fn blocks(sizes: &[u64]) -> Vec<RamBlock> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| RamBlock {
            name: format!("b{i}"),
            size,
        })
        .collect()
}

/// (image, chunk) of the chunks produced.
fn chunks(out: &[Assembled]) -> Vec<(u32, u64)> {
    out.iter()
        .filter_map(|a| match a {
            Assembled::Chunk { image, chunk, .. } => Some((*image, *chunk)),
            _ => None,
        })
        .collect()
}

fn data_of(out: &[Assembled], key: (u32, u64)) -> Vec<u8> {
    out.iter()
        .find_map(|a| match a {
            Assembled::Chunk { image, chunk, data } if (*image, *chunk) == key => {
                Some(data.clone())
            }
            _ => None,
        })
        .expect("chunk produced")
}

#[test]
fn in_order_pages_finish_chunk_by_chunk() {
    let mut a = PageAssembler::new(4 * PAGE_SIZE);
    a.set_blocks(&blocks(&[10 * PAGE_SIZE as u64]));
    // Chunk 0: page, zero, page, zero -> finished at its 4th page.
    assert_eq!(a.page(0, 0, &page(1)), Some(0));
    a.zero_page(0, 1);
    assert_eq!(a.page(0, 2, &page(2)), Some(0));
    assert_eq!(a.take(), [Assembled::NewImage { image: 0, block: 0 }]);
    a.zero_page(0, 3);
    let out = a.take();
    assert_eq!(chunks(&out), [(0, 0)]);
    assert_eq!(
        data_of(&out, (0, 0)),
        [page(1), page(0), page(2), page(0)].concat()
    );
    // Chunk 1: zero pages only: finished, nothing emitted.
    for p in 4..8 {
        a.zero_page(0, p);
    }
    assert!(a.take().is_empty());
    // Chunk 2 is short (2 pages).
    assert_eq!(a.page(0, 9, &page(3)), Some(0));
    assert!(a.take().is_empty(), "page 8 not seen yet");
    a.zero_page(0, 8);
    let out = a.take();
    assert_eq!(chunks(&out), [(0, 2)]);
    assert_eq!(data_of(&out, (0, 2)), [page(0), page(3)].concat());
    // Out of range pages and blocks stay literals.
    assert_eq!(a.page(0, 10, &page(1)), None);
    assert_eq!(a.page(1, 0, &page(1)), None);
    assert_eq!(a.placed_pages(), 3);
    assert!(a.finish().is_empty());
}

#[test]
fn pages_behind_or_sent_again_go_to_another_layer() {
    let mut a = PageAssembler::new(2 * PAGE_SIZE);
    a.set_blocks(&blocks(&[8 * PAGE_SIZE as u64]));
    // A scan that starts at page 4 and wraps around.
    for p in 4..8 {
        assert_eq!(a.page(0, p, &page(p as u8)), Some(0));
    }
    let out = a.take();
    assert_eq!(chunks(&out), [], "chunks 2, 3 wait for chunks 0, 1");
    for p in 0..4 {
        assert_eq!(a.page(0, p, &page(p as u8)), Some(0), "the gap fills in");
    }
    assert_eq!(chunks(&a.take()), [(0, 0), (0, 1), (0, 2), (0, 3)]);
    // Pages again (precopy): a second layer, then a third.
    assert_eq!(a.page(0, 5, &page(50)), Some(1));
    assert_eq!(a.page(0, 5, &page(51)), Some(2));
    let out = a.finish();
    assert_eq!(
        out,
        [
            Assembled::NewImage { image: 1, block: 0 },
            Assembled::NewImage { image: 2, block: 0 },
            Assembled::Chunk {
                image: 1,
                chunk: 2,
                data: [page(0), page(50)].concat()
            },
            Assembled::Chunk {
                image: 2,
                chunk: 2,
                data: [page(0), page(51)].concat()
            },
        ]
    );
    assert_eq!(a.block_of(2).name, "b0");
    // At most MAX_LAYERS layers per block.
    let mut a = PageAssembler::new(PAGE_SIZE);
    a.set_blocks(&blocks(&[PAGE_SIZE as u64]));
    for i in 0..MAX_LAYERS {
        assert_eq!(a.page(0, 0, &page(1)), Some(i as u32));
    }
    assert_eq!(a.page(0, 0, &page(1)), None);
}

#[test]
fn pages_ahead_wait_and_finish_in_order() {
    let mut a = PageAssembler::new(2 * PAGE_SIZE);
    a.set_blocks(&blocks(&[8 * PAGE_SIZE as u64, 4 * PAGE_SIZE as u64]));
    // A page of chunk 3 and one of the second block arrive before chunk 0 is done.
    assert_eq!(a.page(0, 6, &page(6)), Some(0));
    assert_eq!(a.page(1, 1, &page(7)), Some(1));
    assert_eq!(a.page(0, 0, &page(1)), Some(0));
    a.zero_page(0, 1);
    let out = a.take();
    assert_eq!(chunks(&out), [(0, 0)]);
    // The end finishes the rest, ascending per image; missing pages are zero.
    let rest = a.finish();
    assert_eq!(chunks(&rest), [(0, 3), (1, 0)]);
    assert_eq!(data_of(&rest, (0, 3)), [page(6), page(0)].concat());
    assert_eq!(data_of(&rest, (1, 0)), [page(0), page(7)].concat());
}

#[test]
fn one_page_chunks_ahead_do_not_move_the_scan() {
    // With one page per chunk a page ahead is complete at once; it must still wait.
    let mut a = PageAssembler::new(PAGE_SIZE);
    a.set_blocks(&blocks(&[100 * PAGE_SIZE as u64]));
    a.page(0, 0, &page(0));
    a.page(0, 50, &page(50));
    for p in 1..100 {
        if p != 50 {
            assert_eq!(a.page(0, p, &page(p as u8)), Some(0), "page {p}");
        }
    }
    let out = a.finish();
    assert_eq!(chunks(&out), (0..100).map(|c| (0, c)).collect::<Vec<_>>());
}

#[test]
fn held_pages_are_bounded() {
    let chunk = 16 * PAGE_SIZE;
    let mut a = PageAssembler::new(chunk);
    let pages = 32 * MAX_HELD_PAGES as u64;
    a.set_blocks(&blocks(&[pages * PAGE_SIZE as u64]));
    // One page per chunk, never completing any: the budget forces chunks out, lowest first.
    let mut emitted = Vec::new();
    for c in 0..pages / 16 {
        assert_eq!(a.page(0, c * 16, &page(1)), Some(0));
        assert!(a.held <= MAX_HELD_PAGES);
        emitted.extend(chunks(&a.take()));
    }
    emitted.extend(chunks(&a.finish()));
    assert_eq!(emitted, (0..pages / 16).map(|c| (0, c)).collect::<Vec<_>>());
    // A page for a chunk forced out goes to a second layer.
    let mut a = PageAssembler::new(chunk);
    a.set_blocks(&blocks(&[pages * PAGE_SIZE as u64]));
    for c in 0..=MAX_HELD_PAGES as u64 {
        assert_eq!(a.page(0, c * 16, &page(1)), Some(0));
    }
    assert_eq!(a.page(0, 1, &page(2)), Some(1), "chunk 0 was forced out");
}
