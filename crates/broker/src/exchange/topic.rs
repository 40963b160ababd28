//! Topic patterns as RabbitMQ matches them: words split on `.`, `*` is exactly one word, `#` is
//! zero or more words, empty words are words (`a..b` has three), and the empty key has none.

/// Splits a routing key or pattern into words; the empty string has no words.
pub fn split_words(key: &str) -> Vec<String> {
    if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').map(str::to_owned).collect()
    }
}

/// Whether `pattern` (pre-split) matches `key`. Dynamic programming over (pattern, key)
/// positions, so patterns full of `#` cannot blow up.
pub fn matches(pattern: &[String], key: &str) -> bool {
    let words: Vec<&str> = if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').collect()
    };
    // reachable[j]: pattern prefix processed so far can end right before word j.
    let mut reachable = vec![false; words.len() + 1];
    reachable[0] = true;
    for p in pattern {
        let mut next = vec![false; words.len() + 1];
        match p.as_str() {
            "#" => {
                let mut any = false;
                for j in 0..=words.len() {
                    any |= reachable[j];
                    next[j] = any;
                }
            }
            "*" => {
                next[1..].copy_from_slice(&reachable[..words.len()]);
            }
            literal => {
                for j in 0..words.len() {
                    next[j + 1] = reachable[j] && words[j] == literal;
                }
            }
        }
        reachable = next;
        if !reachable.iter().any(|&r| r) {
            return false;
        }
    }
    reachable[words.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, k: &str) -> bool {
        matches(&split_words(p), k)
    }

    #[test]
    fn rabbitmq_topic_semantics() {
        let cases = [
            ("a.b.c", "a.b.c", true),
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a.c", false),
            ("a.#.c", "a.c", true),
            ("a.#.c", "a.b.b.c", true),
            ("#", "", true),
            ("#", "a.b", true),
            ("*", "", false),
            ("*", "a", true),
            ("*", "a.b", false),
            ("", "", true),
            ("", "a", false),
            ("a.*", "a.", true),
            ("a.*", "a", false),
            ("a.#", "a", true),
            ("#.a", "a", true),
            ("#.a", "b.a", true),
            ("*.*", "a..", false),
            ("*.*.*", "a..", true),
            ("a..b", "a..b", true),
            ("a.*.b", "a..b", true),
            ("#.#", "", true),
            ("#.*", "", false),
            ("#.*", "x", true),
            ("*.#.*", "a", false),
            ("*.#.*", "a.b", true),
            ("#.b.#", "a.b.c", true),
            ("#.b.#", "b", true),
            ("#.b.#", "a.c", false),
        ];
        for (p, k, want) in cases {
            assert_eq!(m(p, k), want, "pattern {p:?} key {k:?}");
        }
    }

    #[test]
    fn many_hashes_stay_cheap() {
        let p = vec!["#".to_string(); 64];
        let key = vec!["x"; 200].join(".");
        assert!(matches(&p, &key));
    }
}
