//! Statements sent in one round trip: the values written into the SQL text as typed literals,
//! and the text sent with the simple query protocol.
//!
//! sqlx sends a statement with bound parameters in two round trips when it is unnamed (a
//! `Parse` and `Describe`, then the `Bind` and `Execute`), and in one only when it is a named
//! prepared statement kept on the connection. Named statements do not survive a
//! transaction-mode pooler (PgBouncer before 1.21, or with `max_prepared_statements = 0`): a
//! statement prepared on one server connection is missing on the next, or is another client's
//! statement of the same name. Values written as literals need neither: one `Query` message,
//! one answer, whatever sits between the client and the server (what Go's pgx calls its simple
//! protocol mode).
//!
//! Each text value is written as `E'…'::text` with every `\` and `'` doubled, the way libpq's
//! `PQescapeLiteral` writes one: inside an `E''` string those two are the only characters with
//! a meaning, whatever `standard_conforming_strings` says, and sqlx sets `client_encoding` to
//! UTF-8 on every connection, so no byte of a character can end a string. A NUL character
//! cannot be sent at all (PostgreSQL `text` cannot hold one): refused with a typed error.
//! Numbers are quoted and cast (`'300000'::float8`), so a sign is never read as an operator.

use locker_core::{Error, Result};

/// One value of a statement.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Value<'a> {
    /// `text`.
    Text(&'a str),
    /// `text`, or `NULL`.
    MaybeText(Option<&'a str>),
    /// `float8` (finite only).
    Float(f64),
    /// `boolean`.
    Bool(bool),
    /// `text[]`.
    Texts(&'a [&'a str]),
}

#[derive(Debug)]
enum Part {
    Sql(String),
    /// The value at this index (`$1` is 0).
    Value(usize),
}

/// A statement whose placeholders (`$1`, `$2`, …) are replaced by literals at each call.
#[derive(Debug)]
pub(crate) struct Statement {
    /// The SQL with its placeholders, for a prepared statement.
    sql: String,
    parts: Vec<Part>,
    /// The length of the SQL without its values.
    len: usize,
    /// How many values the statement takes.
    arity: usize,
}

impl Statement {
    /// Splits `sql` at its placeholders; a `$` inside a quoted string or identifier is text.
    pub(crate) fn new(sql: &str) -> Statement {
        let mut parts = Vec::new();
        let mut text = String::with_capacity(sql.len());
        let mut arity = 0;
        let mut quote: Option<char> = None;
        let mut chars = sql.chars().peekable();
        while let Some(c) = chars.next() {
            match quote {
                Some(q) => {
                    text.push(c);
                    if c == q {
                        quote = None;
                    }
                }
                None if c == '\'' || c == '"' => {
                    text.push(c);
                    quote = Some(c);
                }
                None if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) => {
                    let mut n = 0usize;
                    while let Some(d) = chars.peek().and_then(|d| d.to_digit(10)) {
                        n = n * 10 + d as usize;
                        chars.next();
                    }
                    assert!(n > 0, "placeholders start at $1: {sql}");
                    if !text.is_empty() {
                        parts.push(Part::Sql(std::mem::take(&mut text)));
                    }
                    parts.push(Part::Value(n - 1));
                    arity = arity.max(n);
                }
                None => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Sql(text));
        }
        let len = parts
            .iter()
            .map(|p| match p {
                Part::Sql(s) => s.len(),
                Part::Value(_) => 0,
            })
            .sum();
        Statement {
            sql: sql.to_owned(),
            parts,
            len,
            arity,
        }
    }

    /// The SQL with its placeholders.
    pub(crate) fn sql(&self) -> &str {
        &self.sql
    }

    /// Checks `values` as [`with`](Self::with) would, for a statement that binds them.
    pub(crate) fn check(&self, values: &[Value<'_>]) -> Result<()> {
        assert_eq!(values.len(), self.arity, "values of a statement");
        for value in values {
            match *value {
                Value::Text(s) | Value::MaybeText(Some(s)) => no_nul(s)?,
                Value::Texts(items) => items.iter().try_for_each(|s| no_nul(s))?,
                Value::Float(f) => finite(f)?,
                Value::MaybeText(None) | Value::Bool(_) => {}
            }
        }
        Ok(())
    }

    /// The statement with `values` written in.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](locker_core::ErrorKind::InvalidInput) for a text with a NUL
    /// character or a number that is not finite.
    ///
    /// # Panics
    /// When `values` does not have one value per placeholder: a bug of the caller, the same at
    /// every call.
    pub(crate) fn with(&self, values: &[Value<'_>]) -> Result<String> {
        assert_eq!(values.len(), self.arity, "values of a statement");
        let mut out = String::with_capacity(self.len + values.iter().map(size).sum::<usize>());
        for part in &self.parts {
            match part {
                Part::Sql(s) => out.push_str(s),
                Part::Value(i) => push_value(&mut out, values[*i])?,
            }
        }
        Ok(out)
    }
}

/// Room for a value (a text's escapes beyond its length grow the string once more at most).
fn size(value: &Value<'_>) -> usize {
    match value {
        Value::Text(s) | Value::MaybeText(Some(s)) => s.len() + 10,
        Value::MaybeText(None) => 10,
        Value::Float(_) => 32,
        Value::Bool(_) => 5,
        Value::Texts(items) => 16 + items.iter().map(|s| s.len() + 10).sum::<usize>(),
    }
}

fn push_value(out: &mut String, value: Value<'_>) -> Result<()> {
    match value {
        Value::Text(s) | Value::MaybeText(Some(s)) => push_text(out, s)?,
        Value::MaybeText(None) => out.push_str("NULL::text"),
        Value::Float(f) => {
            finite(f)?;
            // `Display` of an `f64` writes digits, a point and a sign, never an exponent.
            out.push('\'');
            out.push_str(&f.to_string());
            out.push_str("'::float8");
        }
        Value::Bool(b) => out.push_str(if b { "true" } else { "false" }),
        Value::Texts([]) => out.push_str("'{}'::text[]"),
        Value::Texts(items) => {
            out.push_str("ARRAY[");
            for (i, s) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                push_text(out, s)?;
            }
            out.push_str("]::text[]");
        }
    }
    Ok(())
}

fn finite(f: f64) -> Result<()> {
    if f.is_finite() {
        Ok(())
    } else {
        Err(Error::invalid_input(format!(
            "{f} cannot be sent to PostgreSQL as a duration"
        )))
    }
}

fn no_nul(s: &str) -> Result<()> {
    if s.contains('\0') {
        return Err(Error::invalid_input(
            "PostgreSQL text cannot hold NUL characters",
        ));
    }
    Ok(())
}

/// `E'…'::text`, with `\` and `'` doubled.
fn push_text(out: &mut String, s: &str) -> Result<()> {
    no_nul(s)?;
    out.push_str("E'");
    let mut rest = s;
    while let Some(i) = rest.find(['\'', '\\']) {
        out.push_str(&rest[..=i]);
        out.push_str(&rest[i..=i]);
        rest = &rest[i + 1..];
    }
    out.push_str(rest);
    out.push_str("'::text");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use locker_core::ErrorKind;

    #[test]
    fn placeholders_become_typed_literals() {
        let s = Statement::new("SELECT f($1, $2, $3, $4, $5) WHERE x = '$1' AND \"$2\" = $1");
        let sql = s
            .with(&[
                Value::Text("it's a \\ key"),
                Value::MaybeText(None),
                Value::Float(300000.0),
                Value::Bool(true),
                Value::Texts(&["a", "b'"]),
            ])
            .expect("sql");
        assert_eq!(
            sql,
            "SELECT f(E'it''s a \\\\ key'::text, NULL::text, '300000'::float8, true, \
             ARRAY[E'a'::text,E'b'''::text]::text[]) WHERE x = '$1' AND \"$2\" = \
             E'it''s a \\\\ key'::text"
        );
        assert_eq!(
            Statement::new("SELECT $1")
                .with(&[Value::Texts(&[])])
                .expect("sql"),
            "SELECT '{}'::text[]"
        );
        assert_eq!(
            Statement::new("SELECT $1")
                .with(&[Value::Float(-1.5)])
                .expect("sql"),
            "SELECT '-1.5'::float8"
        );
    }

    #[test]
    fn what_cannot_be_written_is_refused() {
        let s = Statement::new("SELECT $1");
        for bad in [
            Value::Text("a\0b"),
            Value::MaybeText(Some("\0")),
            Value::Texts(&["a", "\0"]),
            Value::Float(f64::NAN),
            Value::Float(f64::INFINITY),
        ] {
            assert_eq!(
                s.with(&[bad]).expect_err("refused").kind(),
                ErrorKind::InvalidInput
            );
            assert_eq!(
                s.check(&[bad]).expect_err("refused").kind(),
                ErrorKind::InvalidInput
            );
        }
        s.check(&[Value::Texts(&["a", "b"])]).expect("fine");
    }
}
