//! Attribute names and values used on spans, as our own documented
//! constants.
//!
//! The `messaging.*`, `server.*` and `error.type` names follow the
//! OpenTelemetry messaging semantic conventions (RabbitMQ flavour); the
//! `mindbus.*` and `cloudevents.*` names are MindBus's and the CloudEvents
//! semantic conventions'.

/// `messaging.system`: always [`RABBITMQ`].
pub const MESSAGING_SYSTEM: &str = "messaging.system";
/// The `messaging.system` value.
pub const RABBITMQ: &str = "rabbitmq";
/// `messaging.operation.name`: `publish`, `process` or `receive`.
pub const MESSAGING_OPERATION_NAME: &str = "messaging.operation.name";
/// `messaging.operation.type`: `send`, `process` or `receive`.
pub const MESSAGING_OPERATION_TYPE: &str = "messaging.operation.type";
/// `messaging.destination.name`: `{exchange}:{routing key}` (send),
/// `{exchange}:{routing key}:{queue}` (receive, process); see
/// [`crate::destination`].
pub const MESSAGING_DESTINATION_NAME: &str = "messaging.destination.name";
/// `messaging.destination.template`: the destination name with agent ids
/// and generated names left out (`mindbus.main:cmd.writer.*`); span names
/// and the `messaging_destination_name` metric label use it.
pub const MESSAGING_DESTINATION_TEMPLATE: &str = "messaging.destination.template";
/// `messaging.destination.anonymous`: true for server-named queues
/// (`amq.gen-*`).
pub const MESSAGING_DESTINATION_ANONYMOUS: &str = "messaging.destination.anonymous";
/// `messaging.destination.temporary`: true for server-named and direct
/// reply-to queues.
pub const MESSAGING_DESTINATION_TEMPORARY: &str = "messaging.destination.temporary";
/// `messaging.destination.subscription.name`: the queue a consumer reads
/// (0.1 shapes only: the queue is part of the destination name now).
pub const MESSAGING_DESTINATION_SUBSCRIPTION_NAME: &str = "messaging.destination.subscription.name";
/// `messaging.batch.message_count`: on a `receive` span that fetched
/// nothing, 0 (a pull that fetched a message is a single-message operation,
/// without it).
pub const MESSAGING_BATCH_MESSAGE_COUNT: &str = "messaging.batch.message_count";
/// `messaging.rabbitmq.destination.routing_key`.
pub const MESSAGING_RABBITMQ_ROUTING_KEY: &str = "messaging.rabbitmq.destination.routing_key";
/// `messaging.rabbitmq.message.delivery_tag`.
pub const MESSAGING_RABBITMQ_DELIVERY_TAG: &str = "messaging.rabbitmq.message.delivery_tag";
/// `messaging.message.id`: the AMQP `message_id` property.
pub const MESSAGING_MESSAGE_ID: &str = "messaging.message.id";
/// `messaging.message.conversation_id`: the AMQP `correlation_id` property.
pub const MESSAGING_MESSAGE_CONVERSATION_ID: &str = "messaging.message.conversation_id";
/// `messaging.message.body.size`: payload bytes.
pub const MESSAGING_MESSAGE_BODY_SIZE: &str = "messaging.message.body.size";
/// `server.address`: the broker host, when configured.
pub const SERVER_ADDRESS: &str = "server.address";
/// `server.port`: the broker port, when configured.
pub const SERVER_PORT: &str = "server.port";
/// `error.type`: the class of error the operation ended with.
pub const ERROR_TYPE: &str = "error.type";

/// `mindbus.message.kind`: command, result, error, event, control, unknown.
pub const MINDBUS_MESSAGE_KIND: &str = "mindbus.message.kind";
/// `mindbus.action`: `data.action` of a COMMAND.
pub const MINDBUS_ACTION: &str = "mindbus.action";
/// `mindbus.error.code`: `data.error.code` of an ERROR.
pub const MINDBUS_ERROR_CODE: &str = "mindbus.error.code";
/// `messaging.client.id`: this process's agent identity (the conventions'
/// "unique identifier for the client that consumes or produces a message").
pub const MESSAGING_CLIENT_ID: &str = "messaging.client.id";
/// `mindbus.agent`: this process's agent identity (0.1; now
/// [`MESSAGING_CLIENT_ID`], kept by `MessagingSpans::legacy_shapes`).
pub const MINDBUS_AGENT: &str = "mindbus.agent";
/// `mindbus.settlement`: how a delivery was settled (acked, nacked,
/// rejected, auto_ack, unsettled, settled_elsewhere).
pub const MINDBUS_SETTLEMENT: &str = "mindbus.settlement";
/// `mindbus.settlement.requeue`: the requeue flag of a nack or reject.
pub const MINDBUS_SETTLEMENT_REQUEUE: &str = "mindbus.settlement.requeue";
/// `mindbus.publish.confirm`: `ack`, `nack`, `not_requested` or `abandoned`.
pub const MINDBUS_PUBLISH_CONFIRM: &str = "mindbus.publish.confirm";
/// `mindbus.message.body`: the payload (opt-in, truncated).
pub const MINDBUS_MESSAGE_BODY: &str = "mindbus.message.body";
/// `mindbus.rpc.parent`: how a RESULT/ERROR found its COMMAND's span
/// (`current` context or `in_flight` match).
pub const MINDBUS_RPC_PARENT: &str = "mindbus.rpc.parent";
/// `opentracing.ref_type` (semantic conventions, OpenTracing
/// compatibility): on a CONSUMER span's link to its producer when the
/// producer is also its parent, so Jaeger shows the reference as `CHILD_OF`.
pub const OPENTRACING_REF_TYPE: &str = "opentracing.ref_type";
/// The `child_of` value of [`OPENTRACING_REF_TYPE`].
pub const CHILD_OF: &str = "child_of";

/// `cloudevents.event_id`.
pub const CLOUDEVENTS_EVENT_ID: &str = "cloudevents.event_id";
/// `cloudevents.event_source`.
pub const CLOUDEVENTS_EVENT_SOURCE: &str = "cloudevents.event_source";
/// `cloudevents.event_type`.
pub const CLOUDEVENTS_EVENT_TYPE: &str = "cloudevents.event_type";
/// `cloudevents.event_subject`.
pub const CLOUDEVENTS_EVENT_SUBJECT: &str = "cloudevents.event_subject";
/// `cloudevents.event_spec_version`.
pub const CLOUDEVENTS_EVENT_SPEC_VERSION: &str = "cloudevents.event_spec_version";

/// Exception event name and attributes (handler errors and panics).
pub const EXCEPTION_EVENT: &str = "exception";
/// `exception.type`.
pub const EXCEPTION_TYPE: &str = "exception.type";
/// `exception.message`.
pub const EXCEPTION_MESSAGE: &str = "exception.message";

/// Name used in span names for a destination that must not appear in
/// them (server-named or reply-to queues).
pub const TEMPORARY_DESTINATION: &str = "(temporary)";
/// Name used in span names for the default exchange with no usable queue.
pub const DEFAULT_DESTINATION: &str = "(default)";

/// True for queue names the broker generated or that stand for direct
/// reply-to: they must not appear in span names or metric labels.
pub fn is_temporary_queue(name: &str) -> bool {
    name.starts_with("amq.gen-") || name.starts_with("amq.rabbitmq.reply-to")
}
