//! A fixed list of 256 distinct, common English words, one per byte value, for reading
//! fingerprints aloud: each byte of a SHA-256 becomes one word (32 words), so people at a
//! ceremony can compare a fingerprint by voice without spelling hex. The list is part of
//! the transcript format: never reorder or change it.

/// Word `i` stands for the byte value `i`.
pub const WORDS: [&str; 256] = [
    "acid", "acorn", "actor", "adult", "agent", "alarm", "album", "alley", "amber", "angel",
    "ankle", "apple", "apron", "arena", "armor", "arrow", "atlas", "attic", "audio", "autumn",
    "avenue", "bacon", "badge", "bakery", "ballet", "bamboo", "banana", "banjo", "barley",
    "barrel", "basket", "beacon", "beaver", "bench", "berry", "bicycle", "bishop", "blanket",
    "blossom", "bonnet", "border", "bottle", "boulder", "bracket", "branch", "bread", "breeze",
    "brick", "bridge", "broom", "bubble", "bucket", "buffalo", "bugle", "butter", "button",
    "cabin", "cactus", "camel", "candle", "canoe", "canyon", "carbon", "carpet", "castle",
    "cattle", "cellar", "cement", "cherry", "chess", "chimney", "circus", "citrus", "clover",
    "cobalt", "coconut", "coffee", "comet", "copper", "coral", "cotton", "cradle", "crater",
    "crayon", "cricket", "crystal", "curtain", "cypress", "daisy", "dancer", "delta", "desert",
    "diamond", "dinner", "doctor", "dolphin", "donkey", "dragon", "drum", "eagle", "echo",
    "eclipse", "elbow", "ember", "engine", "falcon", "feather", "fiddle", "finger", "flute",
    "forest", "fossil", "fountain", "galaxy", "garden", "garlic", "giant", "ginger", "giraffe",
    "glacier", "globe", "goblet", "granite", "grape", "guitar", "hammer", "harbor", "harvest",
    "hazel", "helmet", "hermit", "honey", "horizon", "hornet", "igloo", "island", "ivory",
    "jacket", "jaguar", "jasmine", "jelly", "jigsaw", "jungle", "kayak", "kettle", "kidney",
    "kitten", "ladder", "lagoon", "lantern", "lemon", "leopard", "lettuce", "lily", "lizard",
    "lobster", "magnet", "mammoth", "mango", "maple", "marble", "meadow", "melon", "meteor",
    "mirror", "monkey", "mosaic", "muffin", "mustard", "needle", "nickel", "noodle", "oasis",
    "ocean", "olive", "onion", "orange", "orbit", "orchid", "otter", "oyster", "paddle", "palace",
    "panda", "panther", "parrot", "peach", "pebble", "pelican", "pepper", "piano", "pigeon",
    "pilot", "pioneer", "planet", "pocket", "potato", "puzzle", "quartz", "rabbit", "radish",
    "rainbow", "raven", "ribbon", "river", "robot", "rocket", "saddle", "salmon", "sandal",
    "satin", "scarf", "shadow", "shell", "silver", "skate", "sketch", "sparrow", "spider",
    "spinach", "sponge", "squirrel", "statue", "stone", "summer", "sunset", "swan", "tablet",
    "tango", "teapot", "temple", "thistle", "thunder", "tiger", "tomato", "topaz", "tornado",
    "tower", "tractor", "trumpet", "tulip", "turtle", "umbrella", "unicorn", "valley", "velvet",
    "violin", "volcano", "wagon", "walnut", "whistle", "willow", "window", "winter", "wizard",
    "zebra",
];

/// The words for `bytes`, separated by single spaces.
pub fn to_words(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| WORDS[usize::from(*b)])
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_distinct_and_unambiguous() {
        let mut sorted = WORDS.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 256, "every word once");
        assert!(WORDS
            .iter()
            .all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase())));
        assert_eq!(to_words(&[0, 1, 255]), "acid acorn zebra");
    }
}
