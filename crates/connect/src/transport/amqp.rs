//! AMQP 0-9-1 over TCP with lapin (being written).
