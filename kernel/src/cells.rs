//! What a cell is before it runs: a `%%experiment` magic cell (TOML) or Rust, and whether
//! Rust source is complete, incomplete (an open bracket or string) or invalid (a bracket
//! closed by the wrong kind), which is what `is_complete_request` asks.

/// The first line that marks a cell as an experiment.
pub const EXPERIMENT_MAGIC: &str = "%%experiment";

/// A cell split by kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell<'a> {
    /// `%%experiment [args]` followed by TOML.
    Experiment {
        /// Words after the magic on its line.
        args: Vec<&'a str>,
        /// The TOML body.
        body: &'a str,
    },
    /// Rust (and evcxr `:commands`).
    Rust(&'a str),
}

/// Classify a cell by its first non-blank line.
pub fn classify(code: &str) -> Cell<'_> {
    let trimmed = code.trim_start();
    if let Some(rest) = trimmed.strip_prefix(EXPERIMENT_MAGIC) {
        let (line, body) = rest.split_once('\n').unwrap_or((rest, ""));
        if line.is_empty() || line.starts_with(char::is_whitespace) {
            return Cell::Experiment { args: line.split_whitespace().collect(), body };
        }
    }
    Cell::Rust(code)
}

/// The answer to `is_complete_request`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completeness {
    /// Ready to run.
    Complete,
    /// More lines are needed (an open bracket, string or block comment).
    Incomplete,
    /// Cannot become valid by adding lines.
    Invalid,
}

impl Completeness {
    /// The protocol's status string.
    pub fn as_str(self) -> &'static str {
        match self {
            Completeness::Complete => "complete",
            Completeness::Incomplete => "incomplete",
            Completeness::Invalid => "invalid",
        }
    }
}

/// Whether `code` is complete. Magic cells are always complete (TOML is checked when run).
pub fn completeness(code: &str) -> Completeness {
    match classify(code) {
        Cell::Experiment { .. } => Completeness::Complete,
        Cell::Rust(src) => rust_completeness(src),
    }
}

/// Bracket and string balance of Rust source, skipping comments, strings and char literals.
fn rust_completeness(src: &str) -> Completeness {
    let chars: Vec<char> = src.chars().collect();
    let mut stack = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            '/' if next == Some('/') => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '/' if next == Some('*') => {
                let mut depth = 1;
                i += 2;
                while depth > 0 {
                    match (chars.get(i), chars.get(i + 1)) {
                        (None, _) => return Completeness::Incomplete,
                        (Some('*'), Some('/')) => {
                            depth -= 1;
                            i += 1;
                        }
                        (Some('/'), Some('*')) => {
                            depth += 1;
                            i += 1;
                        }
                        _ => {}
                    }
                    i += 1;
                }
                continue;
            }
            '"' => {
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Completeness::Incomplete,
                        Some('\\') => i += 1,
                        Some('"') => break,
                        _ => {}
                    }
                    i += 1;
                }
            }
            // A char literal ('a', '\n'); a lifetime ('a) has no closing quote two or three on.
            '\'' if chars.get(i + 2) == Some(&'\'') => i += 2,
            '\'' if next == Some('\\') => {
                while i + 1 < chars.len() && chars[i + 1] != '\'' {
                    i += 1;
                }
                i += 1;
            }
            '(' | '[' | '{' => stack.push(c),
            ')' | ']' | '}' => {
                let open = match c {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                if stack.pop() != Some(open) {
                    return Completeness::Invalid;
                }
            }
            _ => {}
        }
        i += 1;
    }
    if stack.is_empty() {
        Completeness::Complete
    } else {
        Completeness::Incomplete
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_cells_are_split_into_args_and_body() {
        let c = classify("%%experiment sweep=layout.ep:1,2\nname = \"x\"\n");
        assert_eq!(c, Cell::Experiment { args: vec!["sweep=layout.ep:1,2"], body: "name = \"x\"\n" });
        assert_eq!(classify("%%experimental\n1"), Cell::Rust("%%experimental\n1"));
        assert_eq!(classify("let x = 1;"), Cell::Rust("let x = 1;"));
    }

    #[test]
    fn rust_completeness_follows_brackets_strings_and_comments() {
        for ok in ["1 + 1", "fn f() { let v = vec![1, 2]; }", "let s = \"{(\";", "// {\n1", "let c = '{';", "fn f<'a>(x: &'a str) {}", "let c = '\\n';"] {
            assert_eq!(completeness(ok), Completeness::Complete, "{ok}");
        }
        for open in ["fn f() {", "let v = vec![1,", "let s = \"abc", "/* comment"] {
            assert_eq!(completeness(open), Completeness::Incomplete, "{open}");
        }
        for bad in ["}", "let x = (1];", "fn f() { ) }"] {
            assert_eq!(completeness(bad), Completeness::Invalid, "{bad}");
        }
        assert_eq!(completeness("%%experiment\nname = [\n"), Completeness::Complete);
    }
}
