//! The input history of this kernel session, answering `history_request` (tail, range and
//! search with glob patterns, `unique` and `n`).

use serde_json::{json, Value};

/// The session number history entries carry (one session per kernel process).
pub const SESSION: u64 = 1;

/// One executed cell.
#[derive(Debug, Clone)]
struct Entry {
    line: u64,
    input: String,
    output: Option<String>,
}

/// Inputs (and plain-text results) by execution count.
#[derive(Debug, Default)]
pub struct History {
    entries: Vec<Entry>,
}

impl History {
    /// Record cell `line` (its execution count) with its plain-text result, if any.
    pub fn push(&mut self, line: u64, input: &str, output: Option<String>) {
        self.entries.push(Entry { line, input: input.to_string(), output });
    }

    /// The `history` list of a `history_reply` for request `content`.
    pub fn query(&self, content: &Value) -> Vec<Value> {
        let output = content.get("output").and_then(Value::as_bool).unwrap_or(false);
        let n = content.get("n").and_then(Value::as_u64).map(|n| n as usize);
        let picked: Vec<&Entry> = match content.get("hist_access_type").and_then(Value::as_str).unwrap_or("tail") {
            "range" => {
                let session = content.get("session").and_then(Value::as_i64).unwrap_or(SESSION as i64);
                let start = content.get("start").and_then(Value::as_u64).unwrap_or(0);
                let stop = content.get("stop").and_then(Value::as_u64).unwrap_or(u64::MAX);
                // Session 0 and negative sessions count back from the current one.
                if session == SESSION as i64 || session <= 0 {
                    self.entries.iter().filter(|e| e.line >= start && e.line < stop).collect()
                } else {
                    Vec::new()
                }
            }
            "search" => {
                let pattern = content.get("pattern").and_then(Value::as_str).unwrap_or("*");
                let unique = content.get("unique").and_then(Value::as_bool).unwrap_or(false);
                let mut hits: Vec<&Entry> = self.entries.iter().filter(|e| glob_match(pattern, &e.input)).collect();
                if unique {
                    // Keep the latest occurrence of each input.
                    let mut seen = std::collections::HashSet::new();
                    hits = hits.into_iter().rev().filter(|e| seen.insert(e.input.as_str())).collect();
                    hits.reverse();
                }
                tail(hits, n)
            }
            _ => tail(self.entries.iter().collect(), n.or(Some(10))),
        };
        picked
            .into_iter()
            .map(|e| {
                if output {
                    json!([SESSION, e.line, [e.input, e.output]])
                } else {
                    json!([SESSION, e.line, e.input])
                }
            })
            .collect()
    }
}

fn tail(v: Vec<&Entry>, n: Option<usize>) -> Vec<&Entry> {
    match n {
        Some(n) if n < v.len() => v[v.len() - n..].to_vec(),
        _ => v,
    }
}

/// Shell-style glob: `*` any run of characters, `?` one character.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Iterative matcher with one backtrack point for the last `*`.
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled() -> History {
        let mut h = History::default();
        for (i, code) in ["1 + 1", "let x = 2;", "1 + 1", "x * 3"].iter().enumerate() {
            h.push(i as u64 + 1, code, Some(format!("out{i}")));
        }
        h
    }

    #[test]
    fn tail_range_and_search_pick_the_right_entries() {
        let h = filled();
        assert_eq!(h.query(&json!({"hist_access_type": "tail", "n": 2})), vec![json!([1, 3, "1 + 1"]), json!([1, 4, "x * 3"])]);
        assert_eq!(h.query(&json!({"hist_access_type": "range", "session": 1, "start": 2, "stop": 3})), vec![json!([1, 2, "let x = 2;"])]);
        assert_eq!(h.query(&json!({"hist_access_type": "search", "pattern": "1*"})).len(), 2);
        assert_eq!(h.query(&json!({"hist_access_type": "search", "pattern": "1*", "unique": true})), vec![json!([1, 3, "1 + 1"])]);
        assert_eq!(h.query(&json!({"hist_access_type": "tail", "n": 1, "output": true})), vec![json!([1, 4, ["x * 3", "out3"]])]);
    }

    #[test]
    fn glob_handles_stars_and_question_marks() {
        assert!(glob_match("*x*", "let x = 2;"));
        assert!(glob_match("1 ? 1", "1 + 1"));
        assert!(!glob_match("1 ? 1", "1 +  1"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a*b", "acbd"));
    }
}
