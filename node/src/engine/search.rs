//! Search over the JSON content of items (DESIGN §3): an index names a key
//! prefix and typed fields read from `$.<field>`; a `Query` is answered by the
//! hot tier (RediSearch, from Debian's `redis-redisearch`) or the cold tier (SQL
//! over JSON in L3), with the same meaning in both:
//!
//! - text is split into tokens at ASCII punctuation and whitespace and
//!   ASCII-lowercased, with no stemming and no stopwords; `eq` on a text field
//!   is a phrase (consecutive tokens), `contains` wants every token anywhere,
//!   `prefix` a token starting with the value (at least 2 characters), `fuzzy`
//!   a token within one edit (values of at least 3 characters);
//! - numeric fields hold JSON numbers; `eq` and `range` (inclusive) apply;
//! - tag fields hold a string or an array of strings (or integers), compared
//!   lowercased and trimmed; elements containing `,` are not tags; `eq` and
//!   `tags` (any of) apply;
//! - a document lacking a field matches no condition on it, and matches `not`.
//!
//! The engine writes index documents itself: for every live JSON item under an
//! index's prefix, a hash `{p}doc:{index}:{id}` with the projected field values,
//! added with `FT.ADD` (RediSearch 1.x) or plain `HSET` for an index created
//! `ON HASH PREFIX` (RediSearch 2.x); the translator emits both forms. Values in
//! queries are tokenized or escaped, so they cannot change a query's structure.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::error::StorageError;
use super::item::{ContentType, SyncItem};
use super::l2::RedisStore;
use super::l3::{Dialect, L3Store};
use super::search_cache::SearchCache;
use super::{Core, SyncEngine};

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
        if self.prefix.len() > super::item::MAX_ID_BYTES || self.prefix.bytes().any(|b| b.is_ascii_control()) {
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

fn index_key(redis_prefix: &str, name: &str) -> String {
    format!("{redis_prefix}idx:{name}")
}

fn doc_prefix(redis_prefix: &str, name: &str) -> String {
    format!("{redis_prefix}doc:{name}:")
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

// ----- hot tier: RediSearch query syntax -----

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

/// A query checked against an index: field types fit the operators, values
/// are tokenized or normalized. Both tiers are written from this one form.
#[derive(Debug, Clone, PartialEq)]
enum Cond {
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

fn check(q: &Query, index: &SearchIndex) -> Result<Cond, StorageError> {
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

// ----- cold tier: SQL over JSON -----

/// A bound SQL argument.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlArg {
    Text(String),
    Num(f64),
}

/// A string literal for `dialect` (MySQL treats `\` as an escape).
fn lit(dialect: Dialect, s: &str) -> String {
    let mut out = s.replace('\'', "''");
    if dialect == Dialect::MySql {
        out = out.replace('\\', "\\\\");
    }
    format!("'{out}'")
}

struct Sql {
    dialect: Dialect,
}

impl Sql {
    fn path(&self, field: &str) -> String {
        format!("'$.\"{field}\"'")
    }

    /// The JSON value of `field` (content as UTF-8 JSON).
    fn extract(&self, field: &str) -> String {
        match self.dialect {
            Dialect::Sqlite => format!("json_extract(content, {})", self.path(field)),
            Dialect::MySql => format!("JSON_EXTRACT(CONVERT(content USING utf8mb4), {})", self.path(field)),
        }
    }

    fn json_type(&self, field: &str) -> String {
        match self.dialect {
            Dialect::Sqlite => format!("json_type(content, {})", self.path(field)),
            Dialect::MySql => format!("JSON_TYPE({})", self.extract(field)),
        }
    }

    fn number(&self, field: &str) -> String {
        match self.dialect {
            Dialect::Sqlite => format!(
                "(CASE WHEN {} IN ('integer','real') THEN {} END)",
                self.json_type(field),
                self.extract(field)
            ),
            Dialect::MySql => format!(
                "(CASE WHEN {} IN ('INTEGER','DOUBLE','DECIMAL','UNSIGNED INTEGER') THEN CAST({} AS DOUBLE) END)",
                self.json_type(field),
                self.extract(field)
            ),
        }
    }

    /// `' ' || tokens of the string value joined by single spaces || ' '`, or NULL.
    fn normalized(&self, field: &str) -> String {
        let (text, is_string) = match self.dialect {
            Dialect::Sqlite => (
                format!("lower({})", self.extract(field)),
                format!("{} = 'text'", self.json_type(field)),
            ),
            Dialect::MySql => (
                format!("LOWER(JSON_UNQUOTE({})) COLLATE utf8mb4_bin", self.extract(field)),
                format!("{} = 'STRING'", self.json_type(field)),
            ),
        };
        let mut e = text;
        for b in 0u8..128 {
            let c = b as char;
            if (c.is_ascii_graphic() || c.is_ascii_whitespace()) && !c.is_ascii_alphanumeric() && c != ' ' {
                e = format!("REPLACE({e}, {}, ' ')", lit(self.dialect, &c.to_string()));
            }
        }
        for _ in 0..5 {
            e = format!("REPLACE({e}, '  ', ' ')");
        }
        let padded = match self.dialect {
            Dialect::Sqlite => format!("(' ' || {e} || ' ')"),
            Dialect::MySql => format!("CONCAT(' ', {e}, ' ')"),
        };
        format!("(CASE WHEN {is_string} THEN {padded} END)")
    }

    /// `norm` contains the token sequence `pattern` (tokens joined by spaces);
    /// `open_end` lets the last token continue (prefix).
    fn has_tokens(&self, norm: &str, pattern: &str, open_end: bool, args: &mut Vec<SqlArg>) -> String {
        let tail = if open_end { "" } else { " " };
        match self.dialect {
            Dialect::Sqlite => {
                args.push(SqlArg::Text(format!("* {pattern}{tail}*")));
                format!("{norm} GLOB ?")
            }
            Dialect::MySql => {
                args.push(SqlArg::Text(format!("% {pattern}{tail}%")));
                format!("{norm} LIKE ?")
            }
        }
    }

    /// A token within one edit of `word`.
    fn fuzzy(&self, norm: &str, word: &str, args: &mut Vec<SqlArg>) -> String {
        let chars: Vec<char> = word.chars().collect();
        let (any, head, tail) = match self.dialect {
            Dialect::Sqlite => ("[^ ]", "* ", " *"),
            Dialect::MySql => ("[^ ]", "(^| )", "( |$)"),
        };
        let mut variants = vec![word.to_string()];
        for i in 0..=chars.len() {
            let (a, b): (String, String) = (chars[..i].iter().collect(), chars[i..].iter().collect());
            variants.push(format!("{a}{any}{b}"));
            if i < chars.len() {
                let rest: String = chars[i + 1..].iter().collect();
                variants.push(format!("{a}{any}{rest}"));
                variants.push(format!("{a}{rest}"));
            }
        }
        match self.dialect {
            Dialect::Sqlite => {
                let parts: Vec<String> = variants
                    .into_iter()
                    .map(|v| {
                        args.push(SqlArg::Text(format!("{head}{v}{tail}")));
                        format!("{norm} GLOB ?")
                    })
                    .collect();
                format!("({})", parts.join(" OR "))
            }
            Dialect::MySql => {
                args.push(SqlArg::Text(format!("{head}({}){tail}", variants.join("|"))));
                format!("{norm} REGEXP ?")
            }
        }
    }

    fn tags(&self, field: &str, values: &[String], args: &mut Vec<SqlArg>) -> String {
        let marks = vec!["?"; values.len()].join(",");
        args.extend(values.iter().map(|v| SqlArg::Text(v.clone())));
        match self.dialect {
            Dialect::Sqlite => format!(
                "EXISTS (SELECT 1 FROM json_each(content, {}) j WHERE j.type IN ('text','integer') \
                 AND instr(j.value, ',') = 0 AND lower(trim(j.value, ' ')) IN ({marks}))",
                self.path(field)
            ),
            Dialect::MySql => {
                let x = self.extract(field);
                format!(
                    "EXISTS (SELECT 1 FROM JSON_TABLE(CASE JSON_TYPE({x}) WHEN 'ARRAY' THEN {x} \
                     WHEN 'STRING' THEN JSON_ARRAY(JSON_UNQUOTE({x})) ELSE JSON_ARRAY() END, \
                     '$[*]' COLUMNS (v LONGTEXT CHARACTER SET utf8mb4 PATH '$')) j WHERE INSTR(j.v, ',') = 0 \
                     AND LOWER(TRIM(j.v)) COLLATE utf8mb4_bin IN ({marks}))"
                )
            }
        }
    }

    /// A boolean SQL expression (never NULL) for `c`.
    fn compile(&self, c: &Cond, args: &mut Vec<SqlArg>) -> String {
        let expr = match c {
            Cond::All => "1=1".to_string(),
            Cond::Phrase(f, t) => self.has_tokens(&self.normalized(f), &t.join(" "), false, args),
            Cond::Words(f, t) => {
                let norm = self.normalized(f);
                let parts: Vec<String> = t.iter().map(|t| self.has_tokens(&norm, t, false, args)).collect();
                parts.join(" AND ")
            }
            Cond::Prefix(f, t) => self.has_tokens(&self.normalized(f), t, true, args),
            Cond::Fuzzy(f, t) => self.fuzzy(&self.normalized(f), t, args),
            Cond::Range(f, lo, hi) => {
                let n = self.number(f);
                let mut parts = vec![format!("{n} IS NOT NULL")];
                for (bound, op) in [(lo, ">="), (hi, "<=")] {
                    if let Some(b) = bound {
                        args.push(SqlArg::Num(*b));
                        parts.push(format!("{n} {op} ?"));
                    }
                }
                parts.join(" AND ")
            }
            Cond::Tags(f, v) => self.tags(f, v, args),
            Cond::And(parts) | Cond::Or(parts) => {
                let sep = if matches!(c, Cond::And(_)) { " AND " } else { " OR " };
                parts
                    .iter()
                    .map(|p| self.compile(p, args))
                    .collect::<Vec<_>>()
                    .join(sep)
            }
            Cond::Not(inner) => format!("NOT {}", self.compile(inner, args)),
        };
        // NULL (a missing field) counts as false, so NOT of it is true.
        format!("COALESCE(({expr}), 0) <> 0")
    }
}

/// The SQL condition (over `sync_items`) for `q` and its arguments.
pub fn to_sql(q: &Query, index: &SearchIndex, dialect: Dialect) -> Result<(String, Vec<SqlArg>), StorageError> {
    let c = check(q, index)?;
    let mut args = Vec::new();
    let cond = Sql { dialect }.compile(&c, &mut args);
    Ok((cond, args))
}

// ----- the registry of indexes -----

struct IndexState {
    def: SearchIndex,
    /// Bumped by every write under the prefix; invalidates cached answers.
    writes: AtomicU64,
}

/// The indexes this node knows (their definitions live in L3) and the cache.
#[derive(Default)]
pub(crate) struct SearchRegistry {
    indexes: RwLock<BTreeMap<String, IndexState>>,
    /// The RediSearch module is 2.x (`ON HASH PREFIX`), else 1.x (`FT.ADD`).
    v2: AtomicBool,
    pub cache: SearchCache,
}

const META_PREFIX: &str = "search_index:";

impl SearchRegistry {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, IndexState>> {
        self.indexes.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, IndexState>> {
        self.indexes.write().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, name: &str) -> Result<(SearchIndex, u64), StorageError> {
        self.read()
            .get(name)
            .map(|s| (s.def.clone(), s.writes.load(Ordering::Acquire)))
            .ok_or_else(|| StorageError::UnknownIndex(name.to_string()))
    }

    /// Loads the index definitions stored in L3.
    pub async fn load(&self, l3: &L3Store) -> Result<(), StorageError> {
        for (_, bytes) in l3.load_blobs_with_prefix(META_PREFIX).await? {
            match serde_json::from_slice::<SearchIndex>(&bytes) {
                Ok(def) => {
                    self.write().insert(
                        def.name.clone(),
                        IndexState {
                            def,
                            writes: AtomicU64::new(0),
                        },
                    );
                }
                Err(e) => tracing::warn!(error = %e, "unreadable search index definition skipped"),
            }
        }
        Ok(())
    }

    /// Invalidates cached answers of the indexes covering `id`.
    pub fn note_write(&self, id: &str) {
        for s in self.read().values() {
            if id.starts_with(&s.def.prefix) {
                s.writes.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    fn doc_commands(&self, l2: &RedisStore, def: &SearchIndex, item: &SyncItem, pipe: &mut redis::Pipeline) {
        let doc = format!("{}{}", doc_prefix(l2.prefix(), &def.name), item.object_id);
        let fields = (!item.tombstone && item.content_type == ContentType::Json)
            .then(|| project(def, &item.content))
            .flatten();
        let v2 = self.v2.load(Ordering::Relaxed);
        match (fields, v2) {
            (Some(fields), false) => {
                let mut c = redis::cmd("FT.ADD");
                c.arg(index_key(l2.prefix(), &def.name))
                    .arg(&doc)
                    .arg(1.0)
                    .arg("REPLACE")
                    .arg("FIELDS");
                for (k, v) in &fields {
                    c.arg(k).arg(v);
                }
                pipe.add_command(c).ignore();
            }
            (Some(fields), true) => {
                pipe.del(&doc).ignore();
                pipe.hset_multiple(&doc, &fields).ignore();
            }
            (None, false) => {
                pipe.cmd("FT.DEL")
                    .arg(index_key(l2.prefix(), &def.name))
                    .arg(&doc)
                    .arg("DD")
                    .ignore();
            }
            (None, true) => {
                pipe.del(&doc).ignore();
            }
        }
    }

    /// Adds the document writes for `item` to `pipe` (every index covering it).
    pub fn queue_docs(&self, l2: &RedisStore, pipe: &mut redis::Pipeline, item: &SyncItem) {
        for s in self.read().values() {
            if item.object_id.starts_with(&s.def.prefix) {
                self.doc_commands(l2, &s.def, item, pipe);
            }
        }
    }

    /// Creates missing RediSearch indexes and fills them from L3. Caller holds
    /// the engine's `apply_lock`, so no write races the backfill.
    pub async fn ensure_indexes(&self, core: &Core, l2: &RedisStore) -> Result<(), StorageError> {
        self.detect_version(l2).await?;
        let defs: Vec<SearchIndex> = self.read().values().map(|s| s.def.clone()).collect();
        for def in defs {
            let exists: redis::RedisResult<redis::Value> = redis::cmd("FT.INFO")
                .arg(index_key(l2.prefix(), &def.name))
                .query_async(&mut l2.conn())
                .await;
            if exists.is_err() {
                self.create_in_redis(core, l2, &def).await?;
            }
        }
        Ok(())
    }

    async fn detect_version(&self, l2: &RedisStore) -> Result<(), StorageError> {
        let modules: redis::Value = redis::cmd("MODULE")
            .arg("LIST")
            .query_async(&mut l2.conn())
            .await
            .map_err(|e| StorageError::Connection(format!("redis MODULE LIST: {e}")))?;
        let version = search_module_version(&modules)
            .ok_or_else(|| StorageError::Backend("the RediSearch module is not loaded in Redis".into()))?;
        self.v2.store(version >= 20000, Ordering::Relaxed);
        Ok(())
    }

    /// FT.CREATE (after dropping any old index of that name) and a backfill of
    /// every live JSON item under the prefix.
    async fn create_in_redis(&self, core: &Core, l2: &RedisStore, def: &SearchIndex) -> Result<(), StorageError> {
        let mut conn = l2.conn();
        let _: redis::RedisResult<redis::Value> = redis::cmd("FT.DROP")
            .arg(index_key(l2.prefix(), &def.name))
            .query_async(&mut conn)
            .await;
        let mut create = redis::cmd("FT.CREATE");
        for a in def.ft_create_args(l2.prefix(), self.v2.load(Ordering::Relaxed)) {
            create.arg(a);
        }
        let _: () = create
            .query_async(&mut conn)
            .await
            .map_err(|e| StorageError::Backend(format!("FT.CREATE {}: {e}", def.name)))?;
        let b = core.backends()?;
        let mut after = def.prefix.clone();
        let mut first = true;
        loop {
            let page = b.l3.scan_from(&def.prefix, &after, !first, 1000).await?;
            first = false;
            let Some(last) = page.last() else { break };
            after = last.object_id.clone();
            let mut pipe = redis::pipe();
            for it in &page {
                self.doc_commands(l2, def, it, &mut pipe);
            }
            l2.run(&pipe, "search backfill").await?;
        }
        Ok(())
    }
}

/// The RediSearch version in a `MODULE LIST` reply (10200 = 1.2.0).
fn search_module_version(reply: &redis::Value) -> Option<i64> {
    let text = |v: &redis::Value| match v {
        redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        redis::Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let redis::Value::Array(modules) = reply else {
        return None;
    };
    modules.iter().find_map(|m| {
        let fields: Vec<(Option<String>, &redis::Value)> = match m {
            redis::Value::Array(kv) => kv
                .chunks(2)
                .filter(|c| c.len() == 2)
                .map(|c| (text(&c[0]), &c[1]))
                .collect(),
            redis::Value::Map(kv) => kv.iter().map(|(k, v)| (text(k), v)).collect(),
            _ => return None,
        };
        let name = fields
            .iter()
            .find(|(k, _)| k.as_deref() == Some("name"))
            .and_then(|(_, v)| text(v))?;
        if name != "ft" && name != "search" {
            return None;
        }
        fields
            .iter()
            .find(|(k, _)| k.as_deref() == Some("ver"))
            .and_then(|(_, v)| match v {
                redis::Value::Int(i) => Some(*i),
                other => text(other).and_then(|t| t.parse().ok()),
            })
    })
}

// ----- the engine API -----

impl SyncEngine {
    /// Registers an index (kept in L3, so it survives restarts), creates it in
    /// RediSearch and fills it from the items already stored. Re-creating an
    /// index of the same name replaces it. The definition replicates: every
    /// node of the cluster gets the index (see `index_catalog`).
    pub async fn create_search_index(&self, index: SearchIndex) -> Result<(), StorageError> {
        index.validate()?;
        // In turn with definitions arriving from peers (see `index_catalog`).
        let _turn = self.core.catalog_lock.lock().await;
        self.install_index(index.clone()).await?;
        self.publish_index(&index).await
    }

    /// Drops an index (its documents too) on every node; the items stay.
    pub async fn drop_search_index(&self, name: &str) -> Result<(), StorageError> {
        let _turn = self.core.catalog_lock.lock().await;
        self.uninstall_index(name).await?;
        self.publish_index_drop(name).await
    }

    /// Makes the index exist on this node.
    pub(crate) async fn install_index(&self, index: SearchIndex) -> Result<(), StorageError> {
        index.validate()?;
        let core = &self.core;
        let b = core.backends()?;
        let def_bytes = serde_json::to_vec(&index).map_err(|e| StorageError::backend("encode index", e))?;
        let _guard = core.apply_lock.lock().await;
        b.l3.save_blob(&format!("{META_PREFIX}{}", index.name), 0, &def_bytes)
            .await?;
        core.search.write().insert(
            index.name.clone(),
            IndexState {
                def: index.clone(),
                writes: AtomicU64::new(0),
            },
        );
        core.search.cache.forget_prefix(&format!("{}\u{0}", index.name));
        if let Some(l2) = &b.l2
            && core.l2_state.up.load(Ordering::Relaxed)
        {
            let created = async {
                core.search.detect_version(l2).await?;
                core.search.create_in_redis(core, l2, &index).await
            }
            .await;
            if let Err(e) = created {
                // The definition is stored; the next resync creates it in Redis.
                tracing::warn!(error = %e, index = %index.name, "could not create the index in Redis yet");
                core.l2_state.stale.store(true, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Drops the index on this node.
    pub(crate) async fn uninstall_index(&self, name: &str) -> Result<(), StorageError> {
        let core = &self.core;
        let b = core.backends()?;
        let _guard = core.apply_lock.lock().await;
        if core.search.write().remove(name).is_none() {
            return Err(StorageError::UnknownIndex(name.to_string()));
        }
        b.l3.delete_blob(&format!("{META_PREFIX}{name}")).await?;
        core.search.cache.forget_prefix(&format!("{name}\u{0}"));
        if let Some(l2) = &b.l2 {
            let key = index_key(l2.prefix(), name);
            let cmd = if core.search.v2.load(Ordering::Relaxed) {
                vec!["FT.DROPINDEX", &key, "DD"]
            } else {
                vec!["FT.DROP", &key]
            };
            let mut c = redis::cmd(cmd[0]);
            for a in &cmd[1..] {
                c.arg(*a);
            }
            let r: redis::RedisResult<redis::Value> = c.query_async(&mut l2.conn()).await;
            if let Err(e) = r {
                tracing::warn!(error = %e, "FT.DROP failed; documents may remain in Redis");
            }
        }
        Ok(())
    }

    /// The indexes this node has.
    pub fn search_indexes(&self) -> Vec<SearchIndex> {
        self.core.search.read().values().map(|s| s.def.clone()).collect()
    }

    /// Searches with the default tier (RediSearch, SQL when Redis cannot answer)
    /// and limit 100.
    pub async fn search(&self, index_name: &str, query: &Query) -> Result<SearchResult, StorageError> {
        self.search_with_options(index_name, query, SearchTier::RedisWithSqlFallback, 100)
            .await
    }

    /// Searches `index_name`; ids come back in id order, at most `limit`
    /// (≤ 10,000). Results are cached until a write under the index's prefix.
    pub async fn search_with_options(
        &self,
        index_name: &str,
        query: &Query,
        tier: SearchTier,
        limit: usize,
    ) -> Result<SearchResult, StorageError> {
        self.search_page(index_name, query, tier, limit, None).await
    }

    /// A page of `search_with_options`: the matching ids after `after`, in
    /// id order. The hot tier pages exactly while a query matches at most
    /// `MAX_RESULTS` documents; past that the SQL tier answers (or, with
    /// `RedisOnly`, the page is refused).
    pub async fn search_page(
        &self,
        index_name: &str,
        query: &Query,
        tier: SearchTier,
        limit: usize,
        after: Option<&str>,
    ) -> Result<SearchResult, StorageError> {
        let (def, writes) = self.core.search.get(index_name)?;
        let limit = limit.clamp(1, MAX_RESULTS);
        let hot = to_redisearch(query, &def)?;
        let key = format!(
            "{index_name}\u{0}{tier:?}\u{0}{limit}\u{0}{}\u{0}{}",
            after.unwrap_or(""),
            serde_json::to_string(query).map_err(|e| StorageError::backend("encode query", e))?
        );
        if let Some(ids) = self.core.search.cache.get(&key, writes) {
            return self.search_result(ids, SearchSource::Cache, true).await;
        }
        let b = self.core.backends()?;
        let l2 = b.l2.as_ref().filter(|_| {
            self.core.l2_state.up.load(Ordering::Relaxed) && !self.core.l2_state.stale.load(Ordering::Relaxed)
        });
        let (ids, source) = match (tier, l2) {
            (SearchTier::SqlOnly, _) => (self.cold_ids(&def, query, after, limit).await?, SearchSource::Cold),
            (SearchTier::RedisOnly, None) => {
                return Err(StorageError::Connection(
                    "Redis is unavailable or resyncing; the hot tier cannot answer".into(),
                ));
            }
            (SearchTier::RedisOnly, Some(l2)) => (self.hot_ids(l2, &def, &hot, after, limit).await?, SearchSource::Hot),
            (SearchTier::RedisWithSqlFallback, Some(l2)) => match self.hot_ids(l2, &def, &hot, after, limit).await {
                Ok(ids) => (ids, SearchSource::Hot),
                Err(e) => {
                    tracing::debug!(error = %e, "hot tier failed; answering from SQL");
                    (self.cold_ids(&def, query, after, limit).await?, SearchSource::Cold)
                }
            },
            (SearchTier::RedisWithSqlFallback, None) => {
                (self.cold_ids(&def, query, after, limit).await?, SearchSource::Cold)
            }
        };
        self.core.search.cache.put(key, writes, ids.clone());
        let source = if ids.is_empty() { SearchSource::Empty } else { source };
        self.search_result(ids, source, false).await
    }

    async fn search_result(
        &self,
        ids: Vec<String>,
        source: SearchSource,
        cached: bool,
    ) -> Result<SearchResult, StorageError> {
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let items = self.get_many(&refs).await?.into_iter().flatten().collect();
        Ok(SearchResult {
            ids,
            items,
            source,
            cached,
        })
    }

    /// Matching ids from RediSearch, in id order, after `after`. RediSearch
    /// 1.2 cannot sort by id: every match is fetched and sorted here, which
    /// is exact only up to `MAX_RESULTS` matches (more is an error, which
    /// sends the fallback tier to SQL).
    async fn hot_ids(
        &self,
        l2: &RedisStore,
        def: &SearchIndex,
        query: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StorageError> {
        let prefix = doc_prefix(l2.prefix(), &def.name);
        let reply: redis::Value = tokio::time::timeout(
            Duration::from_secs(5),
            redis::cmd("FT.SEARCH")
                .arg(index_key(l2.prefix(), &def.name))
                .arg(query)
                .arg("NOCONTENT")
                .arg("VERBATIM")
                .arg("LIMIT")
                .arg(0)
                .arg(MAX_RESULTS)
                .query_async(&mut l2.conn()),
        )
        .await
        .map_err(|_| StorageError::Connection("FT.SEARCH timed out".into()))?
        .map_err(|e| StorageError::Backend(format!("FT.SEARCH: {e}")))?;
        let redis::Value::Array(parts) = reply else {
            return Err(StorageError::Backend("FT.SEARCH gave an unexpected reply".into()));
        };
        let total = match parts.first() {
            Some(redis::Value::Int(n)) => *n as usize,
            _ => 0,
        };
        if total > MAX_RESULTS {
            return Err(StorageError::Backend(format!(
                "the query matches {total} documents, more than the hot tier can order ({MAX_RESULTS})"
            )));
        }
        let mut ids: Vec<String> = parts
            .iter()
            .skip(1)
            .filter_map(|v| match v {
                redis::Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
                redis::Value::SimpleString(s) => Some(s.clone()),
                _ => None,
            })
            .filter_map(|k| k.strip_prefix(&prefix).map(str::to_string))
            .filter(|id| after.is_none_or(|a| id.as_str() > a))
            .collect();
        ids.sort();
        ids.truncate(limit);
        Ok(ids)
    }

    async fn cold_ids(
        &self,
        def: &SearchIndex,
        query: &Query,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StorageError> {
        let b = self.core.backends()?;
        let (cond, args) = to_sql(query, def, b.l3.dialect())?;
        b.l3.search_ids(&def.prefix, after, &cond, &args, limit).await
    }

    /// A raw RediSearch query string against the index (hot tier only, not
    /// cached). The string goes to FT.SEARCH as given.
    pub async fn search_raw(
        &self,
        index_name: &str,
        query_str: &str,
        limit: usize,
    ) -> Result<Vec<SyncItem>, StorageError> {
        let (def, _) = self.core.search.get(index_name)?;
        let b = self.core.backends()?;
        let l2 =
            b.l2.as_ref()
                .ok_or_else(|| StorageError::InvalidInput("search_raw needs redis_url".into()))?;
        let ids = self
            .hot_ids(l2, &def, query_str, None, limit.clamp(1, MAX_RESULTS))
            .await?;
        Ok(self.search_result(ids, SearchSource::Hot, false).await?.items)
    }

    /// The cold tier directly (SQL over L3), not cached.
    pub async fn search_sql(
        &self,
        index_name: &str,
        query: &Query,
        limit: usize,
    ) -> Result<Vec<SyncItem>, StorageError> {
        let (def, _) = self.core.search.get(index_name)?;
        let ids = self.cold_ids(&def, query, None, limit.clamp(1, MAX_RESULTS)).await?;
        Ok(self.search_result(ids, SearchSource::Cold, false).await?.items)
    }

    pub fn search_cache_stats(&self) -> Option<super::search_cache::SearchCacheStats> {
        Some(self.core.search.cache.stats())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users() -> SearchIndex {
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
