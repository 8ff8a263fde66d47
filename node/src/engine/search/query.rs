//! Index definitions and queries, checked: an index names a key prefix and
//! typed fields read from `$.<field>`; a `Query` is checked against it into
//! a `Cond`, the one form both tiers are written from (see `redisearch` and
//! `sql`). Also the tokenizer and the projection of a document's fields.

use serde::{Deserialize, Serialize};

use crate::engine::error::StorageError;
use crate::engine::item::SyncItem;

/// Most ids one search answers; also what the hot tier fetches before sorting.
pub const MAX_RESULTS: usize = 10_000;
const MAX_FIELDS: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    Text,
    Numeric,
    Tag,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SearchField {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: FieldType,
    #[serde(default)]
    pub sortable: bool,
}

/// An index over the JSON content of the items whose id starts with `prefix`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SearchIndex {
    pub name: String,
    pub prefix: String,
    pub fields: Vec<SearchField>,
}

impl SearchIndex {
    pub fn new(name: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            prefix: prefix.into(),
            fields: Vec::new(),
        }
    }

    fn field(mut self, name: impl Into<String>, kind: FieldType, sortable: bool) -> Self {
        self.fields.push(SearchField {
            name: name.into(),
            kind,
            sortable,
        });
        self
    }

    pub fn text(self, name: impl Into<String>) -> Self {
        self.field(name, FieldType::Text, false)
    }

    pub fn text_sortable(self, name: impl Into<String>) -> Self {
        self.field(name, FieldType::Text, true)
    }

    pub fn numeric(self, name: impl Into<String>) -> Self {
        self.field(name, FieldType::Numeric, false)
    }

    pub fn numeric_sortable(self, name: impl Into<String>) -> Self {
        self.field(name, FieldType::Numeric, true)
    }

    pub fn tag(self, name: impl Into<String>) -> Self {
        self.field(name, FieldType::Tag, false)
    }

    /// Names: letters, digits, `_`, `-` (index) or `_` (fields), 1..=64
    /// characters; fields unique, 1..=32 of them; the prefix a valid id prefix.
    pub fn validate(&self) -> Result<(), StorageError> {
        let bad = |m: String| Err(StorageError::InvalidInput(m));
        let ok_name = |n: &str, extra: &[char]| {
            !n.is_empty()
                && n.len() <= 64
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || extra.contains(&c))
        };
        if !ok_name(&self.name, &['-']) {
            return bad(format!("index name {:?} must be 1-64 of [A-Za-z0-9_-]", self.name));
        }
        if crate::engine::item::validate_prefix(&self.prefix).is_err() {
            return bad("index prefix is not a valid id prefix".into());
        }
        if self.fields.is_empty() || self.fields.len() > MAX_FIELDS {
            return bad(format!("an index has 1..={MAX_FIELDS} fields"));
        }
        for (i, f) in self.fields.iter().enumerate() {
            if !ok_name(&f.name, &[]) || f.name.starts_with("__") {
                return bad(format!(
                    "field name {:?} must be 1-64 of [A-Za-z0-9_], not starting with __",
                    f.name
                ));
            }
            if self.fields[..i].iter().any(|g| g.name == f.name) {
                return bad(format!("field {:?} appears twice", f.name));
            }
        }
        Ok(())
    }

    fn field_type(&self, name: &str) -> Result<FieldType, StorageError> {
        self.fields
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.kind)
            .ok_or_else(|| StorageError::InvalidInput(format!("index {:?} has no field {name:?}", self.name)))
    }
}

/// A JSON value in an `eq` query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum QueryValue {
    Number(f64),
    Text(String),
}

impl From<&str> for QueryValue {
    fn from(s: &str) -> Self {
        Self::Text(s.to_string())
    }
}

impl From<String> for QueryValue {
    fn from(s: String) -> Self {
        Self::Text(s)
    }
}

impl From<f64> for QueryValue {
    fn from(n: f64) -> Self {
        Self::Number(n)
    }
}

impl From<i64> for QueryValue {
    fn from(n: i64) -> Self {
        Self::Number(n as f64)
    }
}

/// The query AST; its JSON form is the one of the HTTP API (DESIGN §7).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Query {
    Eq {
        field: String,
        value: QueryValue,
    },
    Range {
        field: String,
        min: Option<f64>,
        max: Option<f64>,
    },
    Tags {
        field: String,
        values: Vec<String>,
    },
    Contains {
        field: String,
        value: String,
    },
    Prefix {
        field: String,
        value: String,
    },
    Fuzzy {
        field: String,
        value: String,
    },
    And(Vec<Query>),
    Or(Vec<Query>),
    Not(Box<Query>),
    /// Every document of the index.
    All,
}

impl Query {
    pub fn field_eq(field: impl Into<String>, value: impl Into<QueryValue>) -> Self {
        Self::Eq {
            field: field.into(),
            value: value.into(),
        }
    }

    pub fn numeric_range(field: impl Into<String>, min: Option<f64>, max: Option<f64>) -> Self {
        Self::Range {
            field: field.into(),
            min,
            max,
        }
    }

    pub fn tags(field: impl Into<String>, values: Vec<String>) -> Self {
        Self::Tags {
            field: field.into(),
            values,
        }
    }

    pub fn text_search(field: impl Into<String>, value: impl Into<String>) -> Self {
        Self::Contains {
            field: field.into(),
            value: value.into(),
        }
    }

    pub fn prefix(field: impl Into<String>, value: impl Into<String>) -> Self {
        Self::Prefix {
            field: field.into(),
            value: value.into(),
        }
    }

    pub fn fuzzy(field: impl Into<String>, value: impl Into<String>) -> Self {
        Self::Fuzzy {
            field: field.into(),
            value: value.into(),
        }
    }

    pub fn and(self, other: Query) -> Self {
        match self {
            Self::And(mut v) => {
                v.push(other);
                Self::And(v)
            }
            q => Self::And(vec![q, other]),
        }
    }

    pub fn or(self, other: Query) -> Self {
        match self {
            Self::Or(mut v) => {
                v.push(other);
                Self::Or(v)
            }
            q => Self::Or(vec![q, other]),
        }
    }

    pub fn negate(self) -> Self {
        Self::Not(Box::new(self))
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SearchTier {
    /// RediSearch only (`redis`, as DESIGN §7 names it).
    #[serde(alias = "redis")]
    RedisOnly,
    /// SQL only (`sql`).
    #[serde(alias = "sql")]
    SqlOnly,
    /// RediSearch, SQL when Redis cannot answer (`redis-then-sql`).
    #[default]
    #[serde(alias = "redis-then-sql")]
    RedisWithSqlFallback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SearchSource {
    Hot,
    Cold,
    Cache,
    Empty,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchResult {
    /// Matching ids in id order (at most the limit).
    pub ids: Vec<String>,
    pub items: Vec<SyncItem>,
    pub source: SearchSource,
    pub cached: bool,
}

// ----- text -----

/// ASCII punctuation and whitespace split tokens; everything else is a token character.
fn is_separator(c: char) -> bool {
    c.is_ascii() && !c.is_ascii_alphanumeric()
}

/// The tokens of a text value, as both tiers see them.
pub fn tokens(s: &str) -> Vec<String> {
    s.split(is_separator)
        .filter(|t| !t.is_empty())
        .map(|t| t.to_ascii_lowercase())
        .collect()
}

fn one_token(what: &str, value: &str, min_chars: usize) -> Result<String, StorageError> {
    match tokens(value).as_slice() {
        [t] if t.chars().count() >= min_chars => Ok(t.clone()),
        _ => Err(StorageError::InvalidInput(format!(
            "{what} takes one word of at least {min_chars} characters, got {value:?}"
        ))),
    }
}

fn some_tokens(value: &str) -> Result<Vec<String>, StorageError> {
    let t = tokens(value);
    if t.is_empty() {
        return Err(StorageError::InvalidInput(format!(
            "{value:?} has no words to search for"
        )));
    }
    Ok(t)
}

fn tag_value(v: &str) -> Option<String> {
    let t = v.trim_matches(' ').to_ascii_lowercase();
    (!t.is_empty() && !t.contains(',') && !t.bytes().any(|b| b.is_ascii_control())).then_some(t)
}

fn finite(n: f64) -> Result<f64, StorageError> {
    n.is_finite()
        .then_some(n)
        .ok_or_else(|| StorageError::InvalidInput("numbers in queries must be finite".into()))
}

// ----- projection: item JSON → document fields -----

/// The document fields of a JSON object for `index`; `None` when the content is
/// not a JSON object (such items are not indexed, in either tier).
pub fn project(index: &SearchIndex, content: &[u8]) -> Option<Vec<(String, String)>> {
    let serde_json::Value::Object(obj) = serde_json::from_slice(content).ok()? else {
        return None;
    };
    let mut out = vec![("__sn".to_string(), "1".to_string())];
    for f in &index.fields {
        let Some(v) = obj.get(&f.name) else { continue };
        let value = match (f.kind, v) {
            (FieldType::Text, serde_json::Value::String(s)) => Some(tokens(s).join(" ")).filter(|t| !t.is_empty()),
            (FieldType::Numeric, serde_json::Value::Number(n)) => {
                n.as_f64().filter(|x| x.is_finite()).map(|x| x.to_string())
            }
            (FieldType::Tag, serde_json::Value::String(s)) => tag_value(s),
            (FieldType::Tag, serde_json::Value::Array(a)) => {
                let tags: Vec<String> = a
                    .iter()
                    .filter_map(|e| match e {
                        serde_json::Value::String(s) => tag_value(s),
                        serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => tag_value(&n.to_string()),
                        _ => None,
                    })
                    .collect();
                (!tags.is_empty()).then(|| tags.join(","))
            }
            _ => None,
        };
        if let Some(value) = value {
            out.push((f.name.clone(), value));
        }
    }
    Some(out)
}

/// A query checked against an index: field types fit the operators, values
/// are tokenized or normalized. Both tiers are written from this one form.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Cond {
    All,
    /// Consecutive tokens (text `eq`).
    Phrase(String, Vec<String>),
    /// Every token, anywhere (text `contains`).
    Words(String, Vec<String>),
    Prefix(String, String),
    Fuzzy(String, String),
    Range(String, Option<f64>, Option<f64>),
    /// Any of these tags (normalized).
    Tags(String, Vec<String>),
    And(Vec<Cond>),
    Or(Vec<Cond>),
    Not(Box<Cond>),
}

pub(super) fn check(q: &Query, index: &SearchIndex) -> Result<Cond, StorageError> {
    let wrong = |f: &str, t: FieldType, op: &str| {
        Err(StorageError::InvalidInput(format!(
            "{op} does not apply to {t:?} field {f:?}"
        )))
    };
    let f = |field: &String| field.clone();
    Ok(match q {
        Query::All => Cond::All,
        Query::Eq { field, value } => match (index.field_type(field)?, value) {
            (FieldType::Text, QueryValue::Text(v)) => Cond::Phrase(f(field), some_tokens(v)?),
            (FieldType::Numeric, QueryValue::Number(n)) => Cond::Range(f(field), Some(finite(*n)?), Some(*n)),
            (FieldType::Tag, QueryValue::Text(v)) => return check(&Query::tags(field.clone(), vec![v.clone()]), index),
            (t, _) => return wrong(field, t, "eq with this value type"),
        },
        Query::Range { field, min, max } => match index.field_type(field)? {
            FieldType::Numeric => Cond::Range(f(field), min.map(finite).transpose()?, max.map(finite).transpose()?),
            t => return wrong(field, t, "range"),
        },
        Query::Tags { field, values } => match index.field_type(field)? {
            FieldType::Tag => {
                let v: Vec<String> = values.iter().filter_map(|v| tag_value(v)).collect();
                if v.is_empty() {
                    return Err(StorageError::InvalidInput("tags needs at least one tag".into()));
                }
                Cond::Tags(f(field), v)
            }
            t => return wrong(field, t, "tags"),
        },
        Query::Contains { field, value } => match index.field_type(field)? {
            FieldType::Text => Cond::Words(f(field), some_tokens(value)?),
            t => return wrong(field, t, "contains"),
        },
        Query::Prefix { field, value } => match index.field_type(field)? {
            FieldType::Text => Cond::Prefix(f(field), one_token("prefix", value, 2)?),
            t => return wrong(field, t, "prefix"),
        },
        Query::Fuzzy { field, value } => match index.field_type(field)? {
            FieldType::Text => Cond::Fuzzy(f(field), one_token("fuzzy", value, 3)?),
            t => return wrong(field, t, "fuzzy"),
        },
        Query::And(qs) | Query::Or(qs) => {
            if qs.is_empty() {
                return Err(StorageError::InvalidInput("and/or need at least one query".into()));
            }
            let parts: Vec<Cond> = qs.iter().map(|q| check(q, index)).collect::<Result<_, _>>()?;
            if matches!(q, Query::And(_)) {
                Cond::And(parts)
            } else {
                Cond::Or(parts)
            }
        }
        Query::Not(inner) => Cond::Not(Box::new(check(inner, index)?)),
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The index the emitters' tests share.
    pub(in crate::engine::search) fn users() -> SearchIndex {
        SearchIndex::new("users", "user.")
            .text_sortable("name")
            .numeric("age")
            .tag("roles")
    }

    #[test]
    fn tokens_split_at_ascii_punctuation_and_lowercase() {
        assert_eq!(
            tokens("O'Brien, Ädam-Smith  x"),
            vec!["o", "brien", "Ädam", "smith", "x"]
        );
        assert!(tokens(" ,.;").is_empty());
    }

    #[test]
    fn projection_follows_field_types() {
        let doc = br#"{"name":"Alice Smith","age":30,"roles":["Admin"," dev ","a,b",7,true],"x":1}"#;
        let p = project(&users(), doc).unwrap();
        assert_eq!(
            p,
            vec![
                ("__sn".into(), "1".into()),
                ("name".into(), "alice smith".into()),
                ("age".into(), "30".into()),
                ("roles".into(), "admin,dev,7".into())
            ]
        );
        assert!(project(&users(), b"[1,2]").is_none());
        let odd = project(&users(), br#"{"name":5,"age":"old","roles":{}}"#).unwrap();
        assert_eq!(odd.len(), 1, "values of the wrong type are left out");
    }

    #[test]
    fn index_validation() {
        assert!(users().validate().is_ok());
        assert!(SearchIndex::new("bad name", "p").text("a").validate().is_err());
        assert!(SearchIndex::new("i", "p").validate().is_err());
        assert!(SearchIndex::new("i", "p").text("a b").validate().is_err());
        assert!(SearchIndex::new("i", "p").text("__x").validate().is_err());
        assert!(SearchIndex::new("i", "p").text("a").numeric("a").validate().is_err());
        assert!(SearchIndex::new("i", "p\n").text("a").validate().is_err());
    }

    #[test]
    fn query_json_form() {
        let q: Query = serde_json::from_str(
            r#"{"and":[{"eq":{"field":"name","value":"Ann"}},{"range":{"field":"age","min":1,"max":null}},{"not":{"tags":{"field":"roles","values":["a"]}}}]}"#,
        )
        .unwrap();
        assert_eq!(
            q,
            Query::field_eq("name", "Ann")
                .and(Query::numeric_range("age", Some(1.0), None))
                .and(Query::tags("roles", vec!["a".into()]).negate())
        );
    }
}
