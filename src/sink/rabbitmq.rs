//! RabbitMQ sink: placeholder, see the helper branch.
