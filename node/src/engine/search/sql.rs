//! The cold tier's language: a checked query as an SQL condition over
//! `sync_items` (JSON in the `content` column), for SQLite and MySQL, with
//! its arguments bound, never spliced. Pure functions: no server needed.

use super::query::{Cond, Query, SearchIndex, check};
use crate::engine::error::StorageError;
use crate::engine::l3::{Dialect, SqlArg};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::search::query::tests::users;

    fn both(q: &Query) -> [(String, Vec<SqlArg>); 2] {
        [Dialect::Sqlite, Dialect::MySql].map(|d| to_sql(q, &users(), d).unwrap())
    }

    #[test]
    fn values_are_bound_never_spliced() {
        // The statement is the same whatever the value: only the arguments differ.
        let evil = "x'); DROP TABLE sync_items; --";
        let plain = "one two three four five"; // as many tokens
        for (a, b) in [
            (Query::field_eq("name", evil), Query::field_eq("name", plain)),
            (Query::text_search("name", evil), Query::text_search("name", plain)),
            (
                Query::tags("roles", vec![evil.into()]),
                Query::tags("roles", vec![plain.into()]),
            ),
        ] {
            for ((sql_a, args_a), (sql_b, args_b)) in both(&a).into_iter().zip(both(&b)) {
                assert_eq!(sql_a, sql_b);
                assert!(!sql_a.contains("DROP") && !sql_a.contains("sync_items"), "{sql_a}");
                assert_ne!(args_a, args_b);
            }
        }
    }

    #[test]
    fn each_dialect_reads_json_its_own_way() {
        let q = Query::numeric_range("age", Some(18.0), Some(65.5)).and(Query::field_eq("name", "Ann").negate());
        let [(lite, lite_args), (my, my_args)] = both(&q);
        assert!(lite.contains("json_extract(content, '$.\"age\"')"), "{lite}");
        assert!(
            my.contains("JSON_EXTRACT(CONVERT(content USING utf8mb4), '$.\"age\"')"),
            "{my}"
        );
        assert!(lite_args.contains(&SqlArg::Num(18.0)) && lite_args.contains(&SqlArg::Num(65.5)));
        assert_eq!(lite_args.len(), my_args.len());
        assert!(lite.contains("NOT"), "{lite}");
        // An open end adds no bound of its own.
        let (_, open) = to_sql(&Query::numeric_range("age", None, Some(3.0)), &users(), Dialect::Sqlite).unwrap();
        assert_eq!(open, vec![SqlArg::Num(3.0)]);
        // Match-all is a condition that always holds.
        let (all, args) = to_sql(&Query::All, &users(), Dialect::Sqlite).unwrap();
        assert!(args.is_empty() && !all.is_empty(), "{all}");
    }
}
