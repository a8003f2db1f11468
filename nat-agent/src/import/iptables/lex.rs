//! Splitting an `iptables-save` line into words.
//!
//! `iptables-save` double-quotes values that hold anything beyond letters, digits, `-` and `_`
//! (`--comment "a b"`) and escapes `"`, `\` and `'` inside them with a backslash. Single quotes
//! are accepted too, shell style, for rules pasted from scripts.

/// The words of `line`, or why it cannot be split (an unterminated quote).
pub(super) fn words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    // Whether a word is under way: `""` is an empty word, not no word.
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        None => return Err("unterminated double quote".into()),
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            None => return Err("unterminated double quote".into()),
                            Some(escaped) => word.push(escaped),
                        },
                        Some(c) => word.push(c),
                    }
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        None => return Err("unterminated single quote".into()),
                        Some('\'') => break,
                        Some(c) => word.push(c),
                    }
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// Whether `s` is a packet/byte counter pair, `[P:B]`, as in chain headers and in front of
/// rules from `iptables-save -c`.
pub(super) fn is_counters(s: &str) -> bool {
    s.strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .and_then(|s| s.split_once(':'))
        .is_some_and(|(p, b)| is_digits(p) && is_digits(b))
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &str) -> Vec<String> {
        words(s).unwrap()
    }

    #[test]
    fn plain_words() {
        assert_eq!(
            split("  -A  PREROUTING\t-d 1.2.3.4/32 "),
            ["-A", "PREROUTING", "-d", "1.2.3.4/32"]
        );
        assert!(split("").is_empty());
    }

    #[test]
    fn quoting_as_iptables_save_writes_it() {
        assert_eq!(
            split(r#"-m comment --comment "a b" -j ACCEPT"#),
            ["-m", "comment", "--comment", "a b", "-j", "ACCEPT"]
        );
        assert_eq!(
            split(r#"--comment "say \"hi\" \\ o\'k""#),
            ["--comment", r#"say "hi" \ o'k"#]
        );
        assert_eq!(split(r#"--comment """#), ["--comment", ""]);
        assert_eq!(split("--comment 'a b'"), ["--comment", "a b"]);
        assert_eq!(split(r#"x"y z"w"#), ["xy zw"]);
    }

    #[test]
    fn unterminated_quotes_are_errors() {
        assert!(words(r#"--comment "a b"#).is_err());
        assert!(words(r#"--comment "a\"#).is_err());
        assert!(words("--comment 'a").is_err());
    }

    #[test]
    fn counters() {
        assert!(is_counters("[0:0]"));
        assert!(is_counters("[12345:987654321]"));
        for bad in ["[0:]", "[:0]", "0:0", "[a:0]", "[0:0", "[0-0]", "[]"] {
            assert!(!is_counters(bad), "{bad}");
        }
    }
}
