//! Refcount entry encoding for every `refcount_order` (0 to 6).

/// Reads entry `idx` of a refcount block with entries `1 << order` bits wide.
pub fn get(block: &[u8], idx: usize, order: u32) -> u64 {
    let bits = 1usize << order;
    match bits {
        1 | 2 | 4 => {
            let bit = idx * bits;
            let byte = block[bit / 8];
            ((byte >> (bit % 8)) & ((1u8 << bits) - 1)) as u64
        }
        8 => block[idx] as u64,
        16 => u16::from_be_bytes([block[idx * 2], block[idx * 2 + 1]]) as u64,
        32 => {
            let o = idx * 4;
            u32::from_be_bytes([block[o], block[o + 1], block[o + 2], block[o + 3]]) as u64
        }
        _ => {
            let o = idx * 8;
            let mut a = [0u8; 8];
            a.copy_from_slice(&block[o..o + 8]);
            u64::from_be_bytes(a)
        }
    }
}

/// Largest refcount representable with entries `1 << order` bits wide.
pub fn max_value(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}

/// Writes entry `idx`. `value` must not exceed [`max_value`].
pub fn set(block: &mut [u8], idx: usize, order: u32, value: u64) {
    let bits = 1usize << order;
    match bits {
        1 | 2 | 4 => {
            let bit = idx * bits;
            let mask = ((1u8 << bits) - 1) << (bit % 8);
            let b = &mut block[bit / 8];
            *b = (*b & !mask) | (((value as u8) << (bit % 8)) & mask);
        }
        8 => block[idx] = value as u8,
        16 => block[idx * 2..idx * 2 + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        32 => block[idx * 4..idx * 4 + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => block[idx * 8..idx * 8 + 8].copy_from_slice(&value.to_be_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_order_round_trips_without_touching_neighbours() {
        for order in 0..=6 {
            let mut block = vec![0u8; 64];
            let n = (64 * 8) >> order;
            let max = max_value(order);
            for i in 0..n {
                set(&mut block, i, order, (i as u64 * 7 + 3) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get(&block, i, order),
                    (i as u64 * 7 + 3) & max,
                    "order {order}"
                );
            }
            set(&mut block, 5, order, max);
            assert_eq!(get(&block, 5, order), max);
            assert_eq!(get(&block, 4, order), (4 * 7 + 3) & max);
            assert_eq!(get(&block, 6, order), (6 * 7 + 3) & max);
        }
        // Sub-byte widths: bit 0 is the least significant.
        let mut b = [0u8; 1];
        set(&mut b, 0, 0, 1);
        assert_eq!(b[0], 1);
        set(&mut b, 1, 1, 3);
        assert_eq!(b[0], 0b1101);
    }
}
