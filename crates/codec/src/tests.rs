//! Cross-module tests: round trips against amq-protocol.
