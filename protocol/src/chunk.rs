//! Content-defined chunking. An image is read as segments of `SEGMENT_BYTES` at fixed
//! offsets; each segment is cut with FastCDC (2020) independently. Forcing a cut at every
//! segment boundary lets all cores chunk at once, and because a disk image keeps its data at
//! fixed offsets, an unchanged region chunks the same way in every snapshot. Inside a
//! segment, cuts follow content, so an insertion only changes the chunks around it.

/// Cuts are forced at every multiple of this many bytes of the source.
pub const SEGMENT_BYTES: usize = 16 << 20;

/// FastCDC bounds, in bytes. `avg_bytes` must be a power of two.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkerParams {
    pub min_bytes: u32,
    pub avg_bytes: u32,
    pub max_bytes: u32,
}

/// Chosen by measurement on the benchmark image series: see docs/chunking.md.
pub const CHUNKER_DEFAULT: ChunkerParams = ChunkerParams {
    min_bytes: 128 << 10,
    avg_bytes: 512 << 10,
    max_bytes: 2 << 20,
};

/// Largest chunk any supported parameter set can produce: the bound on a sealed chunk's
/// plaintext that `seal::open` enforces.
pub const CHUNK_BYTES_MAX: usize = 16 << 20;

impl ChunkerParams {
    pub fn validate(&self) -> Result<(), String> {
        let ok = self.min_bytes >= fastcdc::v2020::MINIMUM_MIN
            && self.min_bytes <= fastcdc::v2020::MINIMUM_MAX
            && self.avg_bytes >= fastcdc::v2020::AVERAGE_MIN
            && self.avg_bytes <= fastcdc::v2020::AVERAGE_MAX
            && self.max_bytes >= fastcdc::v2020::MAXIMUM_MIN
            && self.max_bytes <= fastcdc::v2020::MAXIMUM_MAX
            && self.avg_bytes.is_power_of_two()
            && self.min_bytes < self.avg_bytes
            && self.avg_bytes < self.max_bytes
            && self.max_bytes as usize <= CHUNK_BYTES_MAX;
        if ok {
            Ok(())
        } else {
            Err(format!("chunker parameters out of range: {self:?}"))
        }
    }

    /// Cut points of one segment as (offset, length) pairs that cover it exactly.
    pub fn cuts(self, segment: &[u8]) -> impl Iterator<Item = (usize, usize)> + '_ {
        debug_assert!(self.validate().is_ok());
        debug_assert!(segment.len() <= SEGMENT_BYTES);
        fastcdc::v2020::FastCDC::new(segment, self.min_bytes, self.avg_bytes, self.max_bytes)
            .map(|chunk| (chunk.offset, chunk.length))
    }
}

/// True when every byte is zero. Zero chunks are never stored: the manifest marks them and
/// restore leaves a hole.
pub fn is_zero(data: &[u8]) -> bool {
    // OR-folding fixed blocks with no early exit inside a block lets LLVM vectorise it.
    let mut blocks = data.chunks_exact(256);
    for block in &mut blocks {
        if block.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_params_are_valid() {
        assert_eq!(CHUNKER_DEFAULT.validate(), Ok(()));
    }

    #[test]
    fn cuts_cover_the_segment_and_respect_bounds() {
        let mut state = 7u64;
        let data: Vec<u8> = (0..5_000_000)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 33) as u8
            })
            .collect();
        let cuts: Vec<_> = CHUNKER_DEFAULT.cuts(&data).collect();
        let mut next = 0;
        for (i, &(offset, len)) in cuts.iter().enumerate() {
            assert_eq!(offset, next);
            assert!(len <= CHUNKER_DEFAULT.max_bytes as usize);
            if i + 1 < cuts.len() {
                assert!(len >= CHUNKER_DEFAULT.min_bytes as usize);
            }
            next += len;
        }
        assert_eq!(next, data.len());
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&vec![0u8; 100_003]));
        let mut data = vec![0u8; 100_003];
        data[100_002] = 1;
        assert!(!is_zero(&data));
        data[100_002] = 0;
        data[0] = 1;
        assert!(!is_zero(&data));
    }
}
