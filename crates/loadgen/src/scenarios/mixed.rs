//! `mixed`: each new stream draws its transport from the weights of `--mix`, seeded, so the
//! same seed gives the same sequence of transports.

use crate::{ctx::mix, stats::Kind};

/// The kind of the stream with `seed` (the only one when there is one).
pub fn pick(weights: &[(Kind, u32)], seed: u64) -> Kind {
    let total: u64 = weights.iter().map(|(_, w)| u64::from(*w)).sum();
    if weights.len() == 1 || total == 0 {
        return weights.first().map_or(Kind::Native, |(k, _)| *k);
    }
    let mut r = mix(seed ^ 0x6d69_7865_645f_6d69) % total;
    for (kind, w) in weights {
        let w = u64::from(*w);
        if r < w {
            return *kind;
        }
        r -= w;
    }
    weights[weights.len() - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_follow_the_weights() {
        let weights = [(Kind::Native, 3), (Kind::Ws, 1)];
        let n = 4000;
        let natives = (0..n)
            .filter(|s| pick(&weights, *s) == Kind::Native)
            .count();
        assert!((2800..3200).contains(&natives), "{natives} of {n}");
        assert_eq!(pick(&[(Kind::Chat, 1)], 7), Kind::Chat);
        assert_eq!(pick(&weights, 42), pick(&weights, 42), "deterministic");
    }
}
