//! Static variable check: every variable a template can read, in every branch, checked against
//! the context's shape. Rendering against a sample context only sees the branches that sample
//! takes; this walks the source instead (`upon` keeps its syntax tree private), so an unknown
//! variable behind an `{% if %}` that the sample does not take is still reported, with its line.
//!
//! It follows `upon`'s syntax: `{{ expr }}`, `{% if [not] expr %}`, `{% else if … %}`,
//! `{% for a[, b] in expr %}` (binding `a`, `b` and `loop`), `{% with expr as name %}`,
//! `{% include "t" [with expr] %}` and `{# comments #}`; an expression is a variable path or a
//! literal followed by `| filter[: args]`. `?.` marks a member that may be missing. Names bound
//! by `for` and `with` are known inside their block; their members are not checked (their
//! shape is the iterated value's).

use serde_json::Value;

/// A variable that the context does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unknown {
    /// The path as written (`user.nmae`).
    pub path: String,
    /// 1-based line of the tag in the part's source.
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Dot,
    OptionalDot,
    Pipe,
    Colon,
    OpenParen,
    Other,
}

fn lex(expr: &str) -> Vec<Tok> {
    let mut out = Vec::new();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '"' {
            // A string literal, escapes included.
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push(Tok::Other);
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(Tok::Ident(chars[start..i].iter().collect()));
        } else if c.is_ascii_digit() {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            // After a dot, digits are a list index (`history.0`), else a number literal.
            out.push(if out.last() == Some(&Tok::Dot) {
                Tok::Ident(chars[start..i].iter().collect())
            } else {
                Tok::Other
            });
        } else {
            i += 1;
            out.push(match c {
                '.' => Tok::Dot,
                '?' if chars.get(i) == Some(&'.') => {
                    i += 1;
                    Tok::OptionalDot
                }
                '|' => Tok::Pipe,
                ':' => Tok::Colon,
                '(' => Tok::OpenParen,
                _ => Tok::Other,
            });
        }
    }
    out
}

/// Variable paths read by an expression's tokens: each root with its members up to the first
/// optional (`?.`) or computed access. A path segment `None` marks the end of what is known.
fn paths(toks: &[Tok]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let Tok::Ident(name) = &toks[i] else {
            i += 1;
            continue;
        };
        let prev = i.checked_sub(1).map(|p| &toks[p]);
        // `.user.name` where an expression starts is a root path written with a leading dot.
        let before_dot = i.checked_sub(2).map(|p| &toks[p]);
        let leading_dot = matches!(prev, Some(Tok::Dot))
            && matches!(before_dot, None | Some(Tok::Colon | Tok::OpenParen));
        let prev = if leading_dot { None } else { prev };
        let next = toks.get(i + 1);
        let is_member = matches!(prev, Some(Tok::Dot | Tok::OptionalDot));
        let is_filter = matches!(prev, Some(Tok::Pipe));
        let is_call = matches!(next, Some(Tok::OpenParen));
        let is_map_key = matches!(next, Some(Tok::Colon));
        let is_keyword = matches!(name.as_str(), "true" | "false" | "not" | "if" | "else");
        if is_member || is_filter || is_call || is_map_key || is_keyword {
            i += 1;
            continue;
        }
        let mut path = vec![name.clone()];
        i += 1;
        while let (Some(Tok::Dot), Some(Tok::Ident(member))) = (toks.get(i), toks.get(i + 1)) {
            path.push(member.clone());
            i += 2;
        }
        out.push(path);
    }
    out
}

/// Whether `path` exists in `shape` (the sample context as JSON). Lists are looked into through
/// their first element; the members of `message.metadata` (the producer's) and of an extracted
/// field's value (its schema's) are not checked.
fn known(shape: &Value, path: &[String]) -> bool {
    let mut at = shape;
    for (depth, key) in path.iter().enumerate() {
        // The producer's metadata and an extracted field's own structure are not known ahead.
        let open = (depth == 2 && path[0] == "message" && path[1] == "metadata")
            || (depth == 2 && path[0] == "extracted");
        if open {
            return true;
        }
        at = match at {
            Value::Object(map) => match map.get(key) {
                Some(v) => v,
                None => return false,
            },
            Value::Array(items) => match key.parse::<usize>() {
                Ok(index) => match items.get(index).or(items.first()) {
                    Some(item) => item,
                    None => return false,
                },
                Err(_) => return false,
            },
            // A member of a string, number or null.
            _ => return false,
        };
    }
    true
}

/// Where `close` ends a tag's inside, skipping string literals (which may hold `}}`).
fn find_close(inside: &str, close: &str) -> Option<usize> {
    let bytes = inside.as_bytes();
    let mut in_string = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if in_string => i += 1,
            b'"' => in_string = !in_string,
            // Bytes, not `str` slices: `i` may sit inside a multi-byte character.
            _ if !in_string && bytes[i..].starts_with(close.as_bytes()) => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

/// The variables of `source` that `shape` (a sample context serialised to JSON) lacks, in every
/// branch. Variables bound by `for` and `with` are known inside their block.
pub fn unknown_variables(source: &str, shape: &Value) -> Vec<Unknown> {
    let mut out = Vec::new();
    // Names bound by enclosing blocks, one frame per open `for`/`with`.
    let mut frames: Vec<Vec<String>> = Vec::new();
    let mut rest = source;
    let mut offset = 0;
    while let Some(open) = rest.find('{') {
        let tag = &rest[open..];
        let close = if tag.starts_with("{{") {
            "}}"
        } else if tag.starts_with("{%") {
            "%}"
        } else if tag.starts_with("{#") {
            "#}"
        } else {
            offset += open + 1;
            rest = &rest[open + 1..];
            continue;
        };
        let Some(end) = find_close(&tag[2..], close) else {
            break;
        };
        let inner = tag[2..2 + end].trim_matches(|c: char| c == '-' || c.is_whitespace());
        let line = source[..offset + open].matches('\n').count() + 1;
        let consumed = open + 2 + end + 2;
        offset += consumed;
        rest = &rest[consumed..];
        if close == "#}" {
            continue;
        }
        let toks = lex(inner);
        let reads = if close == "}}" {
            paths(&toks)
        } else {
            block_reads(&toks, &mut frames)
        };
        for path in reads {
            let bound = frames.iter().any(|f| f.contains(&path[0]));
            if !bound && !known(shape, &path) {
                out.push(Unknown {
                    path: path.join("."),
                    line,
                });
            }
        }
    }
    out
}

/// The variables a block tag (`{% … %}`, lexed) reads; `for` and `with` open a frame of the
/// names they bind, `endfor` and `endwith` close it.
fn block_reads(toks: &[Tok], frames: &mut Vec<Vec<String>>) -> Vec<Vec<String>> {
    let keyword = match toks.first() {
        Some(Tok::Ident(k)) => k.as_str(),
        _ => "",
    };
    match keyword {
        "if" | "else" => paths(&toks[1..]),
        "for" => {
            let in_at = toks
                .iter()
                .position(|t| *t == Tok::Ident("in".into()))
                .unwrap_or(toks.len());
            let reads = paths(&toks[(in_at + 1).min(toks.len())..]);
            let mut frame: Vec<String> = toks[1..in_at]
                .iter()
                .filter_map(|t| match t {
                    Tok::Ident(n) => Some(n.clone()),
                    _ => None,
                })
                .collect();
            frame.push("loop".into());
            frames.push(frame);
            reads
        }
        "with" => {
            let as_at = toks
                .iter()
                .rposition(|t| *t == Tok::Ident("as".into()))
                .unwrap_or(toks.len());
            let reads = paths(&toks[1..as_at]);
            let name = match toks.get(as_at + 1) {
                Some(Tok::Ident(n)) => n.clone(),
                _ => String::new(),
            };
            frames.push(vec![name]);
            reads
        }
        "include" => match toks.iter().position(|t| *t == Tok::Ident("with".into())) {
            Some(with_at) => paths(&toks[with_at + 1..]),
            None => Vec::new(),
        },
        "endfor" | "endwith" => {
            frames.pop();
            Vec::new()
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn shape() -> Value {
        json!({
            "user": {"id": "u"},
            "message": {"content": "hi", "metadata": {}},
            "history": [{"role": "user", "content": "hi"}],
            "extracted": {"name": "n", "date": null},
            "stages": [{"name": "s", "description": "d"}],
            "now": "t"
        })
    }

    #[test]
    fn multi_byte_characters_inside_tags_are_no_problem() {
        assert_eq!(
            unknown("{{ e🇽%2 }} {{ user.id }}é{% if x🇽 %}{% endif %}").len(),
            2
        );
    }

    fn unknown(source: &str) -> Vec<String> {
        unknown_variables(source, &shape())
            .into_iter()
            .map(|u| format!("{}@{}", u.path, u.line))
            .collect()
    }

    #[test]
    fn a_variable_in_a_branch_the_sample_does_not_take_is_reported_with_its_line() {
        let source = "Hello {{ user.id }}\n{% if extracted.date %}\n{{ user.nmae | lower }}\n\
                      {% else if not bogus %}x{% endif %}";
        assert_eq!(unknown(source), vec!["user.nmae@3", "bogus@4"]);
    }

    #[test]
    fn loop_and_with_bindings_literals_filters_and_metadata_are_known() {
        let source = r#"{% for turn in history %}{{ loop.index }} {{ turn.role }}: {{ turn.content | replace: "a", "b" }}{% endfor %}
{% with extracted.name as n %}{{ n }}{% endwith %}{{ message.metadata.anything.deep }}
{{ "literal {{ not a tag }}" }} {{ true }} {{ 42 }} {# {{ comment.only }} #} {{ user?.nickname }}
{% for s in stages %}{{ s.name }}{% endfor %}{{ extracted.date }}"#;
        assert_eq!(unknown(source), Vec::<String>::new());
    }

    #[test]
    fn leading_dots_strings_holding_braces_and_extracted_structures_are_understood() {
        let source = r#"{{ .user.nmae }} {{ "a }} b" | replace: "}}", user.bogus }}
{{ extracted.name.first }}"#;
        assert_eq!(unknown(source), vec!["user.nmae@1", "user.bogus@1"]);
    }

    #[test]
    fn bindings_end_with_their_block_and_unknown_fields_of_known_roots_are_reported() {
        let source = "{% for t in history %}{{ t.content }}{% endfor %}{{ t.content }}\
                      {{ extracted.phone }}{{ history.0.content }}{{ history.0.bogus }}";
        assert_eq!(
            unknown(source),
            vec!["t.content@1", "extracted.phone@1", "history.0.bogus@1"]
        );
    }
}
