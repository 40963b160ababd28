//! AMQP field values as RabbitMQ's management API shows them in JSON: numbers as numbers,
//! strings as strings, tables as objects, arrays as arrays, byte arrays as strings.

use rill_codec::{AMQPValue, FieldArray, FieldTable, LongString};
use serde_json::{Map, Value};

/// A field table as a JSON object.
///
/// ```
/// use rill_codec::{AMQPValue, FieldArray, FieldTable, LongString};
/// let mut t = FieldTable::default();
/// t.insert("x-max-length".into(), AMQPValue::LongInt(10));
/// assert_eq!(rill_http::json::table(&t), serde_json::json!({"x-max-length": 10}));
/// ```
pub fn table(t: &FieldTable) -> Value {
    Value::Object(
        t.inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), value(v)))
            .collect::<Map<_, _>>(),
    )
}

/// One field value.
pub fn value(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(i) => (*i).into(),
        AMQPValue::ShortShortUInt(i) => (*i).into(),
        AMQPValue::ShortInt(i) => (*i).into(),
        AMQPValue::ShortUInt(i) => (*i).into(),
        AMQPValue::LongInt(i) => (*i).into(),
        AMQPValue::LongUInt(i) => (*i).into(),
        AMQPValue::LongLongInt(i) => (*i).into(),
        AMQPValue::Timestamp(t) => (*t).into(),
        AMQPValue::Float(f) => {
            serde_json::Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number)
        }
        AMQPValue::Double(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        AMQPValue::DecimalValue(d) => {
            let scaled = f64::from(d.value) / 10f64.powi(i32::from(d.scale));
            serde_json::Number::from_f64(scaled).map_or(Value::Null, Value::Number)
        }
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_string()),
        AMQPValue::LongString(s) => {
            Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::ByteArray(a) => {
            Value::String(String::from_utf8_lossy(a.as_slice()).into_owned())
        }
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value).collect()),
        AMQPValue::FieldTable(t) => table(t),
        AMQPValue::Void => Value::Null,
    }
}

/// A JSON value that cannot be an AMQP field value (RabbitMQ's reason text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

/// A JSON object as a field table, as RabbitMQ converts it: integers become signed 64-bit
/// `long`s, other numbers doubles, strings long strings, and so on.
///
/// ```
/// use rill_codec::AMQPValue;
/// let t = rill_http::json::from_json_table(&serde_json::json!({"x-max-length": 10})).unwrap();
/// assert_eq!(t.inner().get("x-max-length"), Some(&AMQPValue::LongLongInt(10)));
/// assert!(rill_http::json::from_json_table(&serde_json::json!([1])).is_err());
/// ```
pub fn from_json_table(v: &Value) -> Result<FieldTable, Invalid> {
    let Value::Object(m) = v else {
        return Err(Invalid(format!("arguments must be an object, not {v}")));
    };
    let mut t = FieldTable::default();
    for (k, v) in m {
        t.insert(k.as_str().into(), from_json(v)?);
    }
    Ok(t)
}

fn from_json(v: &Value) -> Result<AMQPValue, Invalid> {
    Ok(match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => AMQPValue::LongLongInt(i),
            (None, Some(f)) => AMQPValue::Double(f),
            (None, None) => return Err(Invalid(format!("number out of range: {n}"))),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes().to_vec())),
        Value::Array(a) => {
            let mut arr = FieldArray::default();
            for e in a {
                arr.push(from_json(e)?);
            }
            AMQPValue::FieldArray(arr)
        }
        Value::Object(_) => AMQPValue::FieldTable(from_json_table(v)?),
    })
}
