//! Label and field selectors, parsed and matched as the API server does.
//!
//! The grammar follows `k8s.io/apimachinery/pkg/labels/selector.go`
//! (requirements separated by commas; `k`, `!k`, `k=v`, `k==v`, `k!=v`,
//! `k in (a,b)`, `k notin (a,b)`, `k > 3`, `k < 3`; blanks between tokens)
//! and `k8s.io/apimachinery/pkg/fields/selector.go` (terms `f=v`, `f==v`,
//! `f!=v` separated by commas, with `\,`, `\=` and `\\` escapes). No Rust
//! crate parses these strings (kube-core only builds them), hence this
//! parser. Which fields a resource can be selected on is the resource's
//! business ([`super::resources::TypeInfo::field_value`]).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// A selector string that does not parse; the message becomes the
/// `BadRequest` Status the client sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SelectorError(pub String);

/// One label requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelRequirement {
    Exists(String),
    DoesNotExist(String),
    Equals(String, String),
    NotEquals(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    GreaterThan(String, i64),
    LessThan(String, i64),
}

/// A parsed label selector; empty matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<LabelRequirement>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Ident(String),
    Bang,
    Eq,
    DoubleEq,
    NotEq,
    Gt,
    Lt,
    Comma,
    Open,
    Close,
}

fn tokenize(s: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        let token = match c {
            c if c.is_whitespace() => continue,
            '!' if chars.peek() == Some(&'=') => {
                chars.next();
                Token::NotEq
            }
            '!' => Token::Bang,
            '=' if chars.peek() == Some(&'=') => {
                chars.next();
                Token::DoubleEq
            }
            '=' => Token::Eq,
            '>' => Token::Gt,
            '<' => Token::Lt,
            ',' => Token::Comma,
            '(' => Token::Open,
            ')' => Token::Close,
            c => {
                let mut ident = String::from(c);
                while let Some(&n) = chars.peek() {
                    if n.is_whitespace() || "!=<>,()".contains(n) {
                        break;
                    }
                    ident.push(n);
                    chars.next();
                }
                Token::Ident(ident)
            }
        };
        tokens.push(token);
    }
    tokens
}

/// A label value as `validation.IsValidLabelValue` accepts it: at most 63
/// characters, alphanumerics with `-_.` inside, possibly empty.
fn valid_label_value(v: &str) -> bool {
    let ok_edge = |c: char| c.is_ascii_alphanumeric();
    v.is_empty()
        || (v.len() <= 63
            && v.starts_with(ok_edge)
            && v.ends_with(ok_edge)
            && v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
}

/// A label key as `validation.IsQualifiedName` accepts it: an optional DNS
/// subdomain prefix and `/`, then a name of at most 63 characters.
fn valid_label_key(k: &str) -> bool {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && part.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && part.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
    });
    prefix_ok && !name.is_empty() && valid_label_value(name)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn key(&mut self) -> Result<String, SelectorError> {
        match self.next() {
            Some(Token::Ident(k)) if valid_label_key(&k) => Ok(k),
            Some(Token::Ident(k)) => Err(SelectorError(format!("invalid label key {k:?}"))),
            other => Err(SelectorError(format!("found {other:?}, expected: identifier"))),
        }
    }

    fn value(&mut self) -> Result<String, SelectorError> {
        // `a=` (an empty value) is legal: the next token is a comma or the end.
        match self.peek() {
            None | Some(Token::Comma) => Ok(String::new()),
            Some(Token::Ident(_)) => {
                let Some(Token::Ident(v)) = self.next() else { unreachable!() };
                if valid_label_value(&v) {
                    Ok(v)
                } else {
                    Err(SelectorError(format!("invalid label value: {v:?}")))
                }
            }
            Some(other) => Err(SelectorError(format!("found {other:?}, expected: identifier"))),
        }
    }

    fn value_set(&mut self) -> Result<BTreeSet<String>, SelectorError> {
        if self.next() != Some(Token::Open) {
            return Err(SelectorError("expected: '('".into()));
        }
        let mut values = BTreeSet::new();
        loop {
            match self.next() {
                Some(Token::Ident(v)) if valid_label_value(&v) => {
                    values.insert(v);
                }
                Some(Token::Ident(v)) => return Err(SelectorError(format!("invalid label value: {v:?}"))),
                Some(Token::Comma) => {
                    values.insert(String::new());
                    continue;
                }
                Some(Token::Close) => break,
                other => return Err(SelectorError(format!("found {other:?}, expected: ',' or ')'"))),
            }
            match self.next() {
                Some(Token::Comma) => {}
                Some(Token::Close) => break,
                other => return Err(SelectorError(format!("found {other:?}, expected: ',' or ')'"))),
            }
        }
        // NewRequirement: "for 'in', 'notin' operators, values set can't be empty".
        if values.is_empty() {
            return Err(SelectorError("for 'in', 'notin' operators, values set can't be empty".into()));
        }
        Ok(values)
    }

    fn integer(&mut self) -> Result<i64, SelectorError> {
        match self.next() {
            Some(Token::Ident(v)) => v
                .parse()
                .map_err(|_| SelectorError(format!("for 'Gt', 'Lt' operators, the value must be an integer: {v:?}"))),
            other => Err(SelectorError(format!("found {other:?}, expected: integer"))),
        }
    }

    fn requirement(&mut self) -> Result<LabelRequirement, SelectorError> {
        if self.peek() == Some(&Token::Bang) {
            self.next();
            return Ok(LabelRequirement::DoesNotExist(self.key()?));
        }
        let key = self.key()?;
        match self.peek() {
            None | Some(Token::Comma) => Ok(LabelRequirement::Exists(key)),
            Some(Token::Eq | Token::DoubleEq) => {
                self.next();
                Ok(LabelRequirement::Equals(key, self.value()?))
            }
            Some(Token::NotEq) => {
                self.next();
                Ok(LabelRequirement::NotEquals(key, self.value()?))
            }
            Some(Token::Gt) => {
                self.next();
                Ok(LabelRequirement::GreaterThan(key, self.integer()?))
            }
            Some(Token::Lt) => {
                self.next();
                Ok(LabelRequirement::LessThan(key, self.integer()?))
            }
            Some(Token::Ident(op)) if op == "in" => {
                self.next();
                Ok(LabelRequirement::In(key, self.value_set()?))
            }
            Some(Token::Ident(op)) if op == "notin" => {
                self.next();
                Ok(LabelRequirement::NotIn(key, self.value_set()?))
            }
            Some(other) => Err(SelectorError(format!("found {other:?}, expected: in, notin, =, ==, !=, gt, lt"))),
        }
    }
}

impl LabelSelector {
    /// Parses a `labelSelector` query value.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut parser = Parser { tokens: tokenize(s), pos: 0 };
        let mut requirements = Vec::new();
        if parser.peek().is_none() {
            return Ok(Self(requirements));
        }
        loop {
            requirements.push(parser.requirement()?);
            match parser.next() {
                None => break,
                Some(Token::Comma) => {}
                Some(other) => return Err(SelectorError(format!("found {other:?}, expected: ','"))),
            }
        }
        Ok(Self(requirements))
    }

    /// Whether an object with these labels is selected.
    #[must_use]
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            LabelRequirement::Exists(k) => labels.contains_key(k),
            LabelRequirement::DoesNotExist(k) => !labels.contains_key(k),
            LabelRequirement::Equals(k, v) => labels.get(k) == Some(v),
            LabelRequirement::NotEquals(k, v) => labels.get(k) != Some(v),
            LabelRequirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            LabelRequirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            LabelRequirement::GreaterThan(k, n) => {
                labels.get(k).and_then(|v| v.parse::<i64>().ok()).is_some_and(|v| v > *n)
            }
            LabelRequirement::LessThan(k, n) => {
                labels.get(k).and_then(|v| v.parse::<i64>().ok()).is_some_and(|v| v < *n)
            }
        })
    }

    /// Whether the selector is empty (selects everything).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One field requirement: `field` must (or must not) equal `value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldRequirement {
    /// The field label, e.g. `spec.nodeName`.
    pub field: String,
    /// The wanted value.
    pub value: String,
    /// `!=` rather than `=`/`==`.
    pub negated: bool,
}

/// A parsed field selector; empty matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(pub Vec<FieldRequirement>);

/// Splits on unescaped `sep`, keeping escapes (fields.splitTerms).
fn split_terms(s: &str) -> Vec<String> {
    let mut terms = vec![String::new()];
    let mut escaped = false;
    for c in s.chars() {
        let current = terms.last_mut().expect("never empty");
        if escaped {
            current.push(c);
            escaped = false;
        } else if c == '\\' {
            current.push(c);
            escaped = true;
        } else if c == ',' {
            terms.push(String::new());
        } else {
            current.push(c);
        }
    }
    terms
}

/// Resolves `\\`, `\,` and `\=` (fields.UnescapeValue); other escapes are
/// errors, as upstream.
fn unescape(s: &str) -> Result<String, SelectorError> {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(e @ ('\\' | ',' | '=')) => out.push(e),
                Some(e) => {
                    return Err(SelectorError(format!("invalid field selector: invalid escape sequence: \\{e}")))
                }
                None => return Err(SelectorError("invalid field selector: unterminated escape sequence".into())),
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// Finds the first unescaped occurrence of one of the operators, trying
/// them in fields.splitTerm's order: `!=`, `==`, `=`.
fn split_term(term: &str) -> Option<(&str, &str, bool)> {
    let bytes = term.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'!' if bytes.get(i + 1) == Some(&b'=') => return Some((&term[..i], &term[i + 2..], true)),
            b'=' if bytes.get(i + 1) == Some(&b'=') => return Some((&term[..i], &term[i + 2..], false)),
            b'=' => return Some((&term[..i], &term[i + 1..], false)),
            _ => i += 1,
        }
    }
    None
}

impl FieldSelector {
    /// Parses a `fieldSelector` query value.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self(requirements));
        }
        for term in split_terms(s) {
            if term.is_empty() {
                continue;
            }
            let Some((field, value, negated)) = split_term(&term) else {
                return Err(SelectorError(format!("invalid selector: '{s}'; can't understand '{term}'")));
            };
            requirements.push(FieldRequirement { field: unescape(field)?, value: unescape(value)?, negated });
        }
        Ok(Self(requirements))
    }

    /// Whether an object is selected; `lookup` gives a field's value as the
    /// resource's field-label conversion does (a missing field is "").
    pub fn matches(&self, lookup: impl Fn(&str) -> Option<String>) -> bool {
        self.0.iter().all(|r| {
            let actual = lookup(&r.field).unwrap_or_default();
            (actual == r.value) != r.negated
        })
    }
}

/// The labels of an object, as a map (non-string values are ignored).
pub fn labels_of(obj: &Value) -> BTreeMap<String, String> {
    obj.pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| m.iter().filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned()))).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn label_selector_supports_every_operator_of_apimachinery() {
        let s = LabelSelector::parse("app=web, tier!=db,env in (prod, staging),!legacy,team,zone notin (a),rank>2")
            .unwrap();
        let l = labels(&[("app", "web"), ("env", "prod"), ("team", "x"), ("zone", "b"), ("rank", "3")]);
        assert!(s.matches(&l));
        assert!(!s.matches(&labels(&[("app", "web"), ("env", "dev"), ("team", "x"), ("rank", "3")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("env", "prod"), ("team", "x"), ("rank", "3"), ("legacy", "")])));
    }

    #[test]
    fn label_selector_treats_double_equals_like_equals_and_allows_empty_values() {
        let s = LabelSelector::parse("a==b,c=").unwrap();
        assert!(s.matches(&labels(&[("a", "b"), ("c", "")])));
        assert!(!s.matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn label_selector_rejects_malformed_input() {
        for bad in ["a in ()", "a in (b", "=b", "a b", "a=b=c", "a>x", "a in b", "a=@"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad} should not parse");
        }
        assert!(LabelSelector::parse("").unwrap().is_empty());
    }

    #[test]
    fn label_selector_accepts_prefixed_keys() {
        let s = LabelSelector::parse("heddle.dev/mesh=enabled").unwrap();
        assert!(s.matches(&labels(&[("heddle.dev/mesh", "enabled")])));
    }

    #[test]
    fn field_selector_parses_operators_and_escapes() {
        let s = FieldSelector::parse(r"spec.nodeName=node-a,metadata.name!=x\,y,status.phase==Running").unwrap();
        assert_eq!(s.0.len(), 3);
        assert_eq!(s.0[1].value, "x,y");
        assert!(s.0[1].negated);
        let lookup = |f: &str| match f {
            "spec.nodeName" => Some("node-a".to_owned()),
            "metadata.name" => Some("p".to_owned()),
            "status.phase" => Some("Running".to_owned()),
            _ => None,
        };
        assert!(s.matches(lookup));
        assert!(FieldSelector::parse("nonsense").is_err());
        assert!(FieldSelector::parse(r"a=\q").is_err());
    }

    #[test]
    fn field_selector_compares_missing_fields_as_empty() {
        let s = FieldSelector::parse("spec.nodeName=").unwrap();
        assert!(s.matches(|_| None));
        let s = FieldSelector::parse("spec.nodeName!=").unwrap();
        assert!(!s.matches(|_| None));
    }
}
