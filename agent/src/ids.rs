//! Random identifiers: the one UUID v4 generator (lease ids, Nomad ACL secrets the agent chooses, the lab's
//! doubles), from the system RNG (aws-lc), in zeroizing buffers since some of them are secrets.

use zeroize::Zeroizing;

/// A random UUID v4 (`xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx`), as Nomad's and Consul's ids are shaped.
pub fn uuid_v4() -> Zeroizing<String> {
    let mut b = Zeroizing::new([0u8; 16]);
    aws_lc_rs::rand::fill(&mut b[..]).expect("system RNG");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = Zeroizing::new(hex::encode(&b[..]));
    Zeroizing::new(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_uuid_v4_has_its_shape_and_is_random() {
        let a = super::uuid_v4();
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'), "{}", *a);
        assert!("89ab".contains(&parts[3][..1]), "{}", *a);
        assert!(a.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
        assert_ne!(*a, *super::uuid_v4());
    }
}
