//! A composite value's text form, as PostgreSQL writes it (`record_out`), read back into its
//! fields.
//!
//! Without prepared statements, the lock functions are called as `SELECT f(…)::text`: one
//! composite column, read as text, where `SELECT … FROM f(…)` made the server plan and run a
//! function scan, which materializes the function's one row (about 10 % of the server's work
//! per lock cycle in `pgbench`, 8 clients).
//!
//! The form: `(` fields separated by `,` `)`; a NULL is nothing at all; a field that is empty
//! or holds a quote, a backslash, a parenthesis, a comma or white space is written between
//! double quotes, with each `"` and `\` inside it doubled; any other field is written as it is.

/// The fields of `text`, `None` for a NULL; `None` altogether for text that is not a composite
/// value's form.
pub(crate) fn fields(text: &str) -> Option<Vec<Option<String>>> {
    let inner = text.strip_prefix('(')?.strip_suffix(')')?;
    let mut out = Vec::with_capacity(6);
    let mut rest = inner;
    loop {
        let (field, after) = match rest.as_bytes().first() {
            // Nothing before the next comma or the end: NULL.
            None | Some(b',') => (None, rest),
            Some(b'"') => {
                let (value, after) = quoted(&rest[1..])?;
                (Some(value), after)
            }
            Some(_) => {
                let end = rest.find(',').unwrap_or(rest.len());
                let value = &rest[..end];
                // `record_out` quotes any field holding one of these.
                if value.contains(['"', '\\', '(', ')']) {
                    return None;
                }
                (Some(value.to_owned()), &rest[end..])
            }
        };
        out.push(field);
        match after.as_bytes().first() {
            None => return Some(out),
            Some(b',') => rest = &after[1..],
            Some(_) => return None,
        }
    }
}

/// A quoted field's value from just after its opening quote, and what follows its closing
/// quote; `None` if it is not closed.
fn quoted(text: &str) -> Option<(String, &str)> {
    let mut value = String::with_capacity(text.len());
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => {
                if text[i + 1..].starts_with('"') {
                    chars.next();
                    value.push('"');
                } else {
                    return Some((value, &text[i + 1..]));
                }
            }
            // A backslash stands for the character after it (`record_in`'s reading).
            '\\' => value.push(chars.next()?.1),
            c => value.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn some(values: &[Option<&str>]) -> Option<Vec<Option<String>>> {
        Some(values.iter().map(|v| v.map(str::to_owned)).collect())
    }

    #[test]
    fn fields_come_back_as_record_out_wrote_them() {
        assert_eq!(
            fields("(acquired,1100901,\"{\"\"a\"\":\"\"b\\\\c\"\"}\",o,,)"),
            some(&[
                Some("acquired"),
                Some("1100901"),
                Some(r#"{"a":"b\c"}"#),
                Some("o"),
                None,
                None
            ])
        );
        assert_eq!(
            fields("(t,,\"\",\"a, b (c)\")"),
            some(&[Some("t"), None, Some(""), Some("a, b (c)")])
        );
        assert_eq!(fields("()"), some(&[None]));
        assert_eq!(fields("(,)"), some(&[None, None]));
        assert_eq!(
            fields("(\"ключ \"\"🔒\"\"\",x)"),
            some(&[Some("ключ \"🔒\""), Some("x")])
        );
    }

    #[test]
    fn other_text_is_refused() {
        for bad in [
            "",
            "(",
            "a,b",
            "(a,b",
            "(\"a,b)",
            "(\"a\"b,c)",
            "(a\"b,c)",
            "(a\\b)",
            "(\"a\\",
            "(\"a\\\")",
        ] {
            assert_eq!(fields(bad), None, "{bad:?}");
        }
    }
}
