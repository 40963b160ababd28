//! Headers-exchange matching as RabbitMQ does it: `x-match` = `all` (default), `any`,
//! `all-with-x`, `any-with-x`; binding arguments whose names start with `x-` are ignored unless
//! the mode ends in `-with-x`; a binding argument of type void matches any value of that header.

use rill_codec::{AMQPValue, FieldTable};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    All,
    Any,
}

pub fn matches(binding_args: &FieldTable, headers: Option<&FieldTable>) -> bool {
    let (mode, with_x) = match binding_args.inner().get("x-match") {
        Some(v) => match string_of(v).as_deref() {
            Some("any") => (Mode::Any, false),
            Some("all-with-x") => (Mode::All, true),
            Some("any-with-x") => (Mode::Any, true),
            _ => (Mode::All, false),
        },
        None => (Mode::All, false),
    };
    let mut all = true;
    let mut any = false;
    for (key, want) in binding_args.inner() {
        let key = key.as_str();
        if key == "x-match" || (!with_x && key.starts_with("x-")) {
            continue;
        }
        let hit = headers
            .and_then(|h| h.inner().get(key))
            .is_some_and(|have| matches!(want, AMQPValue::Void) || values_equal(want, have));
        all &= hit;
        any |= hit;
    }
    match mode {
        Mode::All => all,
        Mode::Any => any,
    }
}

/// Header validation for binding arguments: RabbitMQ refuses an unknown x-match value.
pub fn validate(binding_args: &FieldTable) -> Result<(), String> {
    match binding_args.inner().get("x-match") {
        None => Ok(()),
        Some(v) => match string_of(v).as_deref() {
            Some("all" | "any" | "all-with-x" | "any-with-x") => Ok(()),
            _ => Err(format!(
                "Invalid x-match field value {}; expected all, any, all-with-x, or any-with-x",
                describe(v)
            )),
        },
    }
}

fn describe(v: &AMQPValue) -> String {
    string_of(v).map_or_else(|| format!("{v:?}"), |s| format!("<<\"{s}\">>"))
}

fn string_of(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn as_int(v: &AMQPValue) -> Option<i128> {
    Some(match v {
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        AMQPValue::Timestamp(n) => (*n).into(),
        _ => return None,
    })
}

fn bytes_of(v: &AMQPValue) -> Option<&[u8]> {
    match v {
        AMQPValue::LongString(s) => Some(s.as_bytes()),
        AMQPValue::ShortString(s) => Some(s.as_str().as_bytes()),
        AMQPValue::ByteArray(b) => Some(b.as_slice()),
        _ => None,
    }
}

/// Erlang's `==`: numbers compare by value across widths, strings by bytes.
fn values_equal(a: &AMQPValue, b: &AMQPValue) -> bool {
    if let (Some(x), Some(y)) = (as_int(a), as_int(b)) {
        return x == y;
    }
    if let (Some(x), Some(y)) = (bytes_of(a), bytes_of(b)) {
        return x == y;
    }
    a == b
}

#[cfg(test)]
mod tests {
    use super::*;
    use rill_codec::{LongString, ShortString};

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert(ShortString::from(*k), v.clone());
        }
        t
    }
    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(v))
    }

    #[test]
    fn all_and_any() {
        let all = table(&[("a", s("1")), ("b", s("2"))]);
        let any = table(&[("x-match", s("any")), ("a", s("1")), ("b", s("2"))]);
        let h1 = table(&[("a", s("1"))]);
        let h2 = table(&[("a", s("1")), ("b", s("2")), ("c", s("3"))]);
        assert!(!matches(&all, Some(&h1)));
        assert!(matches(&all, Some(&h2)));
        assert!(matches(&any, Some(&h1)));
        assert!(!matches(&any, None));
        assert!(
            matches(&table(&[]), None),
            "empty all-binding matches everything"
        );
        assert!(!matches(&table(&[("x-match", s("any"))]), Some(&h1)));
    }

    #[test]
    fn x_keys_only_with_x_modes() {
        let b = table(&[("x-match", s("all")), ("x-k", s("v"))]);
        assert!(matches(&b, None), "x- keys ignored");
        let bx = table(&[("x-match", s("all-with-x")), ("x-k", s("v"))]);
        assert!(!matches(&bx, None));
        assert!(matches(&bx, Some(&table(&[("x-k", s("v"))]))));
        let anyx = table(&[("x-match", s("any-with-x")), ("x-k", s("v")), ("y", s("1"))]);
        assert!(matches(&anyx, Some(&table(&[("x-k", s("v"))]))));
    }

    #[test]
    fn void_matches_presence_and_ints_compare_by_value() {
        let b = table(&[("k", AMQPValue::Void)]);
        assert!(matches(&b, Some(&table(&[("k", s("anything"))]))));
        let n = table(&[("n", AMQPValue::LongInt(5))]);
        assert!(matches(
            &n,
            Some(&table(&[("n", AMQPValue::ShortShortUInt(5))]))
        ));
    }
}
