//! Identifiers people read aloud: base32 (RFC 4648 alphabet, no padding) in groups of up to
//! 13 characters, each followed by a Luhn mod 32 check character, printed in dash-separated
//! groups of 7. Syncthing's device ids are the model. Parsing ignores dashes, spaces and
//! case, and a check character catches any single mistyped character and most swaps of
//! neighbours.

use crate::codec::DecodeError;

const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const GROUP_DATA_CHARS: usize = 13;
const DISPLAY_GROUP_CHARS: usize = 7;

fn value_of(c: u8) -> Option<u8> {
    ALPHABET.iter().position(|&a| a == c).map(|p| p as u8)
}

pub(crate) fn base32(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() * 8 / 5 + 1);
    let (mut buffer, mut n_bits) = (0u32, 0u32);
    for &byte in bytes {
        buffer = buffer << 8 | u32::from(byte);
        n_bits += 8;
        while n_bits >= 5 {
            n_bits -= 5;
            out.push(ALPHABET[(buffer >> n_bits & 31) as usize]);
        }
    }
    if n_bits > 0 {
        out.push(ALPHABET[(buffer << (5 - n_bits) & 31) as usize]);
    }
    out
}

/// Decodes unchecked base32 of any length (for tokens, whose signature guards them).
pub(crate) fn unbase32_vec(what: &'static str, chars: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::with_capacity(chars.len() * 5 / 8);
    let (mut buffer, mut n_bits) = (0u32, 0u32);
    for &c in chars {
        let value = value_of(c.to_ascii_uppercase()).ok_or(DecodeError::Invalid {
            what,
            why: format!("{:?} is not a letter A-Z or digit 2-7", char::from(c)),
        })?;
        buffer = buffer << 5 | u32::from(value);
        n_bits += 5;
        if n_bits >= 8 {
            n_bits -= 8;
            out.push((buffer >> n_bits) as u8);
        }
        buffer &= (1 << n_bits) - 1;
    }
    if buffer != 0 || n_bits >= 5 {
        return Err(DecodeError::Invalid {
            what,
            why: "truncated or padded".into(),
        });
    }
    Ok(out)
}

fn unbase32<const N: usize>(what: &'static str, chars: &[u8]) -> Result<[u8; N], DecodeError> {
    unbase32_vec(what, chars)?
        .try_into()
        .map_err(|_| DecodeError::Invalid {
            what,
            why: "wrong length".into(),
        })
}

/// Luhn mod 32 over a group: weights alternate 1, 2 from the left.
fn check_char(group: &[u8]) -> u8 {
    let mut sum = 0u32;
    for (i, &c) in group.iter().enumerate() {
        let weight = if i % 2 == 0 { 1 } else { 2 };
        let addend = u32::from(value_of(c).expect("group holds base32 characters")) * weight;
        sum += addend / 32 + addend % 32;
    }
    ALPHABET[((32 - sum % 32) % 32) as usize]
}

/// Length of the printed form (without dashes) of an N-byte value.
const fn checked_len(n_bytes: usize) -> usize {
    let n_data = (n_bytes * 8).div_ceil(5);
    n_data + n_data.div_ceil(GROUP_DATA_CHARS)
}

/// Prints `bytes` as dash-separated groups with check characters.
pub fn encode(bytes: &[u8]) -> String {
    let data = base32(bytes);
    let mut checked = Vec::with_capacity(checked_len(bytes.len()));
    for group in data.chunks(GROUP_DATA_CHARS) {
        checked.extend_from_slice(group);
        checked.push(check_char(group));
    }
    let groups: Vec<&str> = checked
        .chunks(DISPLAY_GROUP_CHARS)
        .map(|g| std::str::from_utf8(g).expect("base32 is ASCII"))
        .collect();
    groups.join("-")
}

/// Names the printed groups of 7 that characters `start..end` (dashes not counted) fall
/// in: a check character covers 13 characters and itself, which is two printed groups, so
/// a typo can only be placed to one of the two ("group 1 or 2"). Keys already printed must
/// keep decoding, so the layout stays and the message says what it knows.
fn printed_groups(start: usize, end: usize) -> String {
    let (first, last) = (
        start / DISPLAY_GROUP_CHARS + 1,
        (end - 1) / DISPLAY_GROUP_CHARS + 1,
    );
    if first == last {
        format!("group {first}")
    } else {
        format!("group {first} or {last}")
    }
}

/// Parses what `encode` printed, in either case, with or without dashes and spaces.
pub fn decode<const N: usize>(what: &'static str, text: &str) -> Result<[u8; N], DecodeError> {
    let chars: Vec<u8> = text
        .bytes()
        .filter(|b| !matches!(b, b'-' | b' '))
        .map(|b| b.to_ascii_uppercase())
        .collect();
    if chars.len() != checked_len(N) {
        return Err(DecodeError::Invalid {
            what,
            why: format!(
                "expected {} characters (not counting dashes), got {}",
                checked_len(N),
                chars.len()
            ),
        });
    }
    let mut data = Vec::with_capacity(chars.len());
    for (group_idx, group) in chars.chunks(GROUP_DATA_CHARS + 1).enumerate() {
        let (body, check) = group.split_at(group.len() - 1);
        if let Some(bad) = body.iter().chain(check).find(|&&c| value_of(c).is_none()) {
            return Err(DecodeError::Invalid {
                what,
                why: format!("{:?} is not a letter A-Z or digit 2-7", char::from(*bad)),
            });
        }
        if check_char(body) != check[0] {
            let start = group_idx * (GROUP_DATA_CHARS + 1);
            return Err(DecodeError::Invalid {
                what,
                why: format!(
                    "typo in {} (check character does not match)",
                    printed_groups(start, start + group.len())
                ),
            });
        }
        data.extend_from_slice(body);
    }
    unbase32(what, &data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn ids_round_trip_in_any_case_with_or_without_dashes(bytes: [u8; 32]) {
            let text = encode(&bytes);
            prop_assert_eq!(decode::<32>("id", &text).unwrap(), bytes);
            prop_assert_eq!(decode::<32>("id", &text.to_lowercase()).unwrap(), bytes);
            prop_assert_eq!(decode::<32>("id", &text.replace('-', "")).unwrap(), bytes);
            prop_assert_eq!(decode::<32>("id", &text.replace('-', " ")).unwrap(), bytes);
        }

        #[test]
        fn fingerprints_round_trip(bytes: [u8; 20]) {
            prop_assert_eq!(decode::<20>("fingerprint", &encode(&bytes)).unwrap(), bytes);
        }

        #[test]
        fn any_single_typo_is_caught(bytes: [u8; 32], position: usize, replacement: usize) {
            let text: Vec<u8> = encode(&bytes).into_bytes();
            let letters: Vec<usize> = (0..text.len()).filter(|&i| text[i] != b'-').collect();
            let at = letters[position % letters.len()];
            let mut typo = text.clone();
            let new = ALPHABET[replacement % 32];
            prop_assume!(new != text[at]);
            typo[at] = new;
            prop_assert!(decode::<32>("id", std::str::from_utf8(&typo).unwrap()).is_err());
        }

        #[test]
        fn decoding_never_panics(text in "[A-Za-z0-9 -]{0,80}") {
            let _ = decode::<32>("id", &text);
        }
    }

    /// A 20-byte key prints as 5 groups: a typo is named by the printed group it is in,
    /// or the pair of printed groups one check character covers.
    #[test]
    fn a_typo_names_the_printed_group_it_is_in() {
        let bytes: [u8; 20] = std::array::from_fn(|i| (i * 53 + 7) as u8);
        let text = encode(&bytes);
        let groups: Vec<&str> = text.split('-').collect();
        assert_eq!(groups.len(), 5);
        for (printed_idx, expected) in [
            (0, "group 1 or 2"),
            (1, "group 1 or 2"),
            (2, "group 3 or 4"),
            (3, "group 3 or 4"),
            (4, "group 5"),
        ] {
            let mut typo: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
            let first = typo[printed_idx].as_bytes()[0];
            let replacement = if first == b'A' { "B" } else { "A" };
            typo[printed_idx].replace_range(0..1, replacement);
            let error = decode::<20>("recovery key", &typo.join("-")).unwrap_err();
            assert_eq!(
                error.to_string(),
                format!(
                    "invalid recovery key: typo in {expected} (check character does not match)"
                ),
                "typo in printed group {}",
                printed_idx + 1
            );
        }
    }

    #[test]
    fn looks_like_a_syncthing_id() {
        let text = encode(&[0u8; 32]);
        assert_eq!(text.len(), 56 + 7);
        assert_eq!(text.split('-').count(), 8);
        assert!(text.split('-').all(|g| g.len() == 7));
    }

    #[test]
    fn neighbour_swaps_are_mostly_caught() {
        let bytes: [u8; 32] = std::array::from_fn(|i| (i * 37 + 11) as u8);
        let text: Vec<u8> = encode(&bytes).bytes().filter(|&b| b != b'-').collect();
        let (mut swaps, mut caught) = (0, 0);
        for i in 0..text.len() - 1 {
            if text[i] == text[i + 1] || (i + 1) % (GROUP_DATA_CHARS + 1) == 0 {
                continue; // an identical pair, or a swap across two groups
            }
            let mut swapped = text.clone();
            swapped.swap(i, i + 1);
            swaps += 1;
            caught +=
                usize::from(decode::<32>("id", std::str::from_utf8(&swapped).unwrap()).is_err());
        }
        assert!(caught * 10 >= swaps * 9, "caught {caught} of {swaps} swaps");
    }
}
