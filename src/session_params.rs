//! Session parameters a client expects to hold on whichever server connection
//! runs its next transaction.
//!
//! A client's wanted set is its startup parameters (and `options -c` pairs),
//! kept up to date from the ParameterStatus messages the server reports while the
//! client holds it. A server connection remembers the set last applied to it.
//! Moving a server from one set to another costs one hidden simple query, and
//! only when the sets differ: clients with the same startup parameters share one
//! interned set, so the common check is a pointer comparison.

use std::sync::Arc;

use crate::protocol::error::sqlstate;
use crate::protocol::PgError;

/// Startup keys that are not session parameters.
const NOT_PARAMETERS: &[&str] = &["user", "database", "options"];

/// Reported parameters (GUC_REPORT) that a session can change; a ParameterStatus
/// for one of these updates the client's wanted set. The others (server_version,
/// is_superuser, ...) describe the server and are not the client's to carry.
const TRACKED_REPORTS: &[&str] = &[
    "application_name",
    "client_encoding",
    "datestyle",
    "intervalstyle",
    "timezone",
    "standard_conforming_strings",
    "search_path",
    "default_transaction_read_only",
];

/// ParameterStatus pairs as a server reports them (canonical names).
pub type Reported = Vec<(String, String)>;

/// A set of session parameters, names lower-cased, sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ParamSet {
    entries: Vec<(String, String)>,
}

impl ParamSet {
    /// The parameters a client sent at startup, with `options` expanded.
    /// As in PostgreSQL, `options` applies first and a parameter given on its
    /// own wins over the same one in `options`, wherever each stands in the
    /// packet (pgjdbc sends `options` last).
    pub fn from_startup(params: &[(String, String)]) -> Result<ParamSet, PgError> {
        let mut set = ParamSet::default();
        for (_, value) in params.iter().filter(|(name, _)| name == "options") {
            for (n, v) in parse_options(value)? {
                set.insert(&n, v);
            }
        }
        for (name, value) in params {
            if name == "options" {
                continue;
            } else if name == "replication" {
                return Err(PgError::fatal(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "replication connections are not supported through pgswitch",
                ));
            } else if name.starts_with("_pq_.") || NOT_PARAMETERS.contains(&name.as_str()) {
                // Protocol extensions are optional by definition; user and database select the pool.
            } else {
                set.insert(name, value.clone());
            }
        }
        for (name, _) in &set.entries {
            validate_name(name)?;
        }
        Ok(set)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.entries
            .binary_search_by(|(n, _)| n.as_str().cmp(&name))
            .ok()
            .map(|i| self.entries[i].1.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    fn insert(&mut self, name: &str, value: String) {
        let name = name.to_ascii_lowercase();
        match self
            .entries
            .binary_search_by(|(n, _)| n.as_str().cmp(&name))
        {
            Ok(i) => self.entries[i].1 = value,
            Err(i) => self.entries.insert(i, (name, value)),
        }
    }

    /// The set with values replaced by the server's spelling of them (what
    /// ParameterStatus reported after they were applied: "iso" → "ISO, MDY").
    pub fn normalized_by(mut self, reports: &[(String, String)]) -> ParamSet {
        for (name, value) in reports {
            let lower = name.to_ascii_lowercase();
            if self.get(&lower).is_some() {
                self.insert(&lower, value.clone());
            }
        }
        self
    }

    /// Applies a ParameterStatus the server reported while this set's owner held it.
    /// Returns the updated set when the report changes it.
    pub fn with_report(self: &Arc<Self>, name: &str, value: &str) -> Option<Arc<ParamSet>> {
        let lower = name.to_ascii_lowercase();
        if !TRACKED_REPORTS.contains(&lower.as_str()) || self.get(&lower) == Some(value) {
            return None;
        }
        let mut next = (**self).clone();
        next.insert(&lower, value.to_owned());
        Some(Arc::new(next))
    }

    /// The simple query that moves a server connection whose session currently
    /// holds `current` to `self`, or `None` when nothing differs.
    ///
    /// `set_config(name, value, false)` takes the value as a startup packet or
    /// postgresql.conf would (a list such as search_path stays a list), which
    /// `SET name = 'value'` would not.
    pub fn transition_sql(&self, current: &ParamSet) -> Option<String> {
        if self == current {
            return None;
        }
        let sets: Vec<String> = self
            .iter()
            .filter(|(n, v)| current.get(n) != Some(v))
            .map(|(n, v)| {
                format!(
                    "pg_catalog.set_config({}, {}, false)",
                    quote_literal(n),
                    quote_literal(v)
                )
            })
            .collect();
        let resets: Vec<String> = current
            .iter()
            .filter(|(n, _)| self.get(n).is_none())
            .map(|(n, _)| format!("RESET {n}"))
            .collect();
        let mut sql = String::new();
        if !sets.is_empty() {
            sql.push_str("SELECT ");
            sql.push_str(&sets.join(", "));
        }
        for reset in resets {
            if !sql.is_empty() {
                sql.push_str("; ");
            }
            sql.push_str(&reset);
        }
        (!sql.is_empty()).then_some(sql)
    }
}

/// An escape-string literal, immune to the session's standard_conforming_strings.
fn quote_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 3);
    out.push_str("E'");
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Parameter names go into SQL unquoted (RESET), so only identifier characters pass.
fn validate_name(name: &str) -> Result<(), PgError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(PgError::fatal(
            sqlstate::INVALID_PARAMETER_VALUE,
            format!("invalid startup parameter name {name:?}"),
        ))
    }
}

/// Parses libpq's `options` value: `-c name=value`, `-cname=value` or
/// `--name=value`, separated by spaces; a backslash escapes the next character.
fn parse_options(options: &str) -> Result<Vec<(String, String)>, PgError> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_ascii_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let unsupported = |w: &str| {
        PgError::fatal(
            sqlstate::FEATURE_NOT_SUPPORTED,
            format!("unsupported startup option {w:?}: pgswitch accepts only -c name=value and --name=value"),
        )
    };
    let mut pairs = Vec::new();
    let mut words = words.into_iter();
    while let Some(w) = words.next() {
        let setting = if w == "-c" {
            words.next().ok_or_else(|| unsupported(&w))?
        } else if let Some(rest) = w.strip_prefix("-c").or_else(|| w.strip_prefix("--")) {
            rest.to_owned()
        } else {
            return Err(unsupported(&w));
        };
        let (name, value) = setting
            .split_once('=')
            .ok_or_else(|| unsupported(&setting))?;
        pairs.push((name.replace('-', "_"), value.to_owned()));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn startup_params_skip_user_and_expand_options() {
        let set = ParamSet::from_startup(&startup(&[
            ("user", "app"),
            ("database", "db"),
            ("DateStyle", "ISO"),
            (
                "options",
                "-c statement_timeout=5s --lock-timeout=1s -csearch_path=a,\\ b",
            ),
        ]))
        .unwrap();
        let got: Vec<_> = set.iter().collect();
        assert_eq!(
            got,
            vec![
                ("datestyle", "ISO"),
                ("lock_timeout", "1s"),
                ("search_path", "a, b"),
                ("statement_timeout", "5s")
            ]
        );
    }

    #[test]
    fn a_parameter_of_its_own_wins_over_options() {
        // pgjdbc's order: the parameters, then options.
        let set = ParamSet::from_startup(&startup(&[
            ("TimeZone", "America/Denver"),
            ("search_path", "x_param"),
            (
                "options",
                "-c TimeZone=Asia/Tokyo -c search_path=x_opts -c work_mem=1MB",
            ),
        ]))
        .unwrap();
        assert_eq!(set.get("timezone"), Some("America/Denver"));
        assert_eq!(set.get("search_path"), Some("x_param"));
        assert_eq!(set.get("work_mem"), Some("1MB"));
    }

    #[test]
    fn hostile_names_and_options_are_refused() {
        assert!(ParamSet::from_startup(&startup(&[("x; DROP TABLE t", "1")])).is_err());
        assert!(ParamSet::from_startup(&startup(&[("options", "-X")])).is_err());
        assert!(ParamSet::from_startup(&startup(&[("options", "-c")])).is_err());
        assert!(ParamSet::from_startup(&startup(&[("replication", "database")])).is_err());
    }

    #[test]
    fn transition_sets_differences_and_resets_leftovers() {
        let want = ParamSet::from_startup(&startup(&[
            ("application_name", "it's"),
            ("TimeZone", "UTC"),
        ]))
        .unwrap();
        let have =
            ParamSet::from_startup(&startup(&[("timezone", "UTC"), ("search_path", "x")])).unwrap();
        assert_eq!(
            want.transition_sql(&have).unwrap(),
            "SELECT pg_catalog.set_config(E'application_name', E'it''s', false); RESET search_path"
        );
        assert_eq!(want.transition_sql(&want), None);
    }

    #[test]
    fn reports_update_only_tracked_names() {
        let set = Arc::new(ParamSet::default());
        assert!(set.with_report("server_version", "17.0").is_none());
        let next = set.with_report("TimeZone", "Europe/Paris").unwrap();
        assert_eq!(next.get("timezone"), Some("Europe/Paris"));
        assert!(next.with_report("TimeZone", "Europe/Paris").is_none());
    }

    #[test]
    fn literals_escape_backslashes() {
        assert_eq!(quote_literal(r"a\'b"), r"E'a\\''b'");
    }
}
