//! Reproducible test data: one pseudo-random generator, seeds a failing run prints so it can be
//! replayed, and byte buffers of chosen compressibility.

/// splitmix64: small, fast, reproducible; the same seed gives the same bytes on every machine.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (0 when n is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Random bytes: incompressible.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }

    /// Bytes with 4 random bits each: never repeating, compressible to about half.
    pub fn fill_semi(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = (self.next_u64() & 0x0f0f_0f0f_0f0f_0f0f).to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// A seed from the clock, or from `VMKEEP_TEST_SEED`; printed so a failure can be replayed.
pub fn seed(name: &str) -> u64 {
    let s = std::env::var("VMKEEP_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("{name}: seed {s} (replay with VMKEEP_TEST_SEED={s})");
    s
}

/// `len` incompressible bytes from `seed`.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

/// `len` bytes from `seed` that compress to about half.
pub fn semi_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill_semi(&mut v);
    v
}

/// A cheap incompressible-looking byte pattern (xorshift), for extents of test images.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_bytes_and_lengths_need_not_be_multiples_of_8() {
        assert_eq!(random_bytes(1003, 7), random_bytes(1003, 7));
        assert_ne!(random_bytes(64, 7), random_bytes(64, 8));
        // A shorter buffer is a prefix of a longer one from the same seed.
        assert_eq!(random_bytes(1003, 7)[..], random_bytes(2048, 7)[..1003]);
        let semi = semi_bytes(4099, 3);
        assert!(semi.iter().all(|b| b & 0xf0 == 0));
        assert_eq!(Rng::new(1).below(0), 0);
    }
}
