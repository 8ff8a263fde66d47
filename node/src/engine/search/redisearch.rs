//! The hot tier's language: a checked query as a RediSearch query string
//! (1.x and 2.x read the same syntax), an index as `FT.CREATE` arguments,
//! and the keys of indexes and documents. Pure functions: no server needed.

use super::query::{Cond, FieldType, Query, SearchIndex, check};
use crate::engine::error::StorageError;

impl SearchIndex {
    /// The RediSearch `FT.CREATE` arguments (after the command name), for 1.x
    /// (`v2 = false`; documents added with FT.ADD) or 2.x (`ON HASH PREFIX`).
    pub fn ft_create_args(&self, redis_prefix: &str, v2: bool) -> Vec<String> {
        let mut a = vec![index_key(redis_prefix, &self.name)];
        if v2 {
            a.extend([
                "ON".into(),
                "HASH".into(),
                "PREFIX".into(),
                "1".into(),
                doc_prefix(redis_prefix, &self.name),
            ]);
        }
        a.extend(["STOPWORDS".into(), "0".into(), "SCHEMA".into()]);
        // Every document carries `__sn`, so documents without indexed fields exist.
        a.extend(["__sn".into(), "TAG".into()]);
        for f in &self.fields {
            a.push(f.name.clone());
            match f.kind {
                FieldType::Text => a.extend(["TEXT".into(), "NOSTEM".into()]),
                FieldType::Numeric => a.push("NUMERIC".into()),
                FieldType::Tag => a.extend(["TAG".into(), "SEPARATOR".into(), ",".into()]),
            }
            if f.sortable {
                a.push("SORTABLE".into());
            }
        }
        a
    }
}

pub(super) fn index_key(redis_prefix: &str, name: &str) -> String {
    format!("{redis_prefix}idx:{name}")
}

pub(super) fn doc_prefix(redis_prefix: &str, name: &str) -> String {
    format!("{redis_prefix}doc:{name}:")
}

/// Escapes every ASCII punctuation character and space in a tag value.
fn escape_tag(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if c.is_ascii() && !c.is_ascii_alphanumeric() {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn num(n: f64) -> String {
    if n == n.trunc() && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

/// The RediSearch query for `q` over `index`.
pub fn to_redisearch(q: &Query, index: &SearchIndex) -> Result<String, StorageError> {
    Ok(redisearch(&check(q, index)?))
}

fn redisearch(c: &Cond) -> String {
    // Groups (and/or/not) already come in parentheses; leaves get their own.
    let wrap = |c: &Cond| match c {
        Cond::And(_) | Cond::Or(_) | Cond::Not(_) => redisearch(c),
        _ => format!("({})", redisearch(c)),
    };
    match c {
        Cond::All => "*".into(),
        Cond::Phrase(f, t) if t.len() == 1 => format!("@{f}:{}", t[0]),
        Cond::Phrase(f, t) => format!("@{f}:\"{}\"", t.join(" ")),
        Cond::Words(f, t) => format!("@{f}:({})", t.join(" ")),
        Cond::Prefix(f, t) => format!("@{f}:{t}*"),
        Cond::Fuzzy(f, t) => format!("@{f}:%{t}%"),
        Cond::Range(f, lo, hi) => {
            let lo = lo.map_or("-inf".to_string(), num);
            let hi = hi.map_or("+inf".to_string(), num);
            format!("@{f}:[{lo} {hi}]")
        }
        Cond::Tags(f, v) => {
            let v: Vec<String> = v.iter().map(|v| escape_tag(v)).collect();
            format!("@{f}:{{{}}}", v.join("|"))
        }
        // Every operand in parentheses: RediSearch 1.x cannot parse `{tag} | @f`.
        Cond::And(parts) => format!("({})", parts.iter().map(wrap).collect::<Vec<_>>().join(" ")),
        Cond::Or(parts) => format!("({})", parts.iter().map(wrap).collect::<Vec<_>>().join(" | ")),
        // "Every document but these", alone or nested.
        Cond::Not(inner) => format!("(-{})", wrap(inner)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::l3::Dialect;
    use crate::engine::search::query::tests::users;
    use crate::engine::search::sql::to_sql;

    #[test]
    fn redisearch_translation_and_escaping() {
        let i = users();
        assert_eq!(
            to_redisearch(&Query::field_eq("name", "Alice"), &i).unwrap(),
            "@name:alice"
        );
        assert_eq!(
            to_redisearch(&Query::field_eq("name", "Alice Smith"), &i).unwrap(),
            "@name:\"alice smith\""
        );
        assert_eq!(
            to_redisearch(&Query::field_eq("age", 30i64), &i).unwrap(),
            "@age:[30 30]"
        );
        assert_eq!(
            to_redisearch(&Query::numeric_range("age", Some(1.5), None), &i).unwrap(),
            "@age:[1.5 +inf]"
        );
        assert_eq!(
            to_redisearch(&Query::tags("roles", vec!["a b".into(), "x|y}".into()]), &i).unwrap(),
            "@roles:{a\\ b|x\\|y\\}}"
        );
        // Injection attempts become plain words.
        assert_eq!(
            to_redisearch(&Query::text_search("name", "x} | @age:[0 100] -*"), &i).unwrap(),
            "@name:(x age 0 100)"
        );
        let q =
            Query::prefix("name", "Al").and(Query::fuzzy("name", "smyth").or(Query::field_eq("age", 3i64)).negate());
        assert_eq!(
            to_redisearch(&q, &i).unwrap(),
            "((@name:al*) (-((@name:%smyth%) | (@age:[3 3]))))"
        );
        for bad in [
            Query::prefix("name", "a"),
            Query::fuzzy("name", "ab"),
            Query::field_eq("nope", "x"),
            Query::numeric_range("name", None, None),
            Query::text_search("age", "x"),
            Query::field_eq("name", "!!"),
            Query::And(vec![]),
            Query::numeric_range("age", Some(f64::NAN), None),
        ] {
            assert!(
                matches!(to_redisearch(&bad, &i), Err(StorageError::InvalidInput(_))),
                "{bad:?}"
            );
            assert!(to_sql(&bad, &i, Dialect::Sqlite).is_err());
        }
    }

    #[test]
    fn ft_create_in_both_syntaxes() {
        let v1 = users().ft_create_args("p:", false).join(" ");
        assert_eq!(
            v1,
            "p:idx:users STOPWORDS 0 SCHEMA __sn TAG name TEXT NOSTEM SORTABLE age NUMERIC roles TAG SEPARATOR ,"
        );
        let v2 = users().ft_create_args("p:", true).join(" ");
        assert!(v2.starts_with("p:idx:users ON HASH PREFIX 1 p:doc:users: STOPWORDS 0 SCHEMA"));
    }
}
