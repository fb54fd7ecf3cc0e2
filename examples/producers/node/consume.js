// Receive Courier's result events: bind a queue of your own to the events exchange.
// The queue is yours (declare it as you like; here a durable quorum queue, so events
// wait for you while you are away). Events may repeat (at-least-once): deduplicate
// by data.requestId. Ack after you have handled an event.
//
//   node consume.js [--count N]
import amqp from "amqplib";

const url = process.env.COURIER_AMQP_URL ?? "amqp://guest:guest@127.0.0.1:5672/";
const exchange = process.env.COURIER_EVENTS_EXCHANGE ?? "courier.events";
const queue = process.env.EVENTS_QUEUE ?? "my-app.courier-events";
const countAt = process.argv.indexOf("--count");
const count = countAt > 0 ? Number(process.argv[countAt + 1]) : Infinity;

async function main() {
  const connection = await amqp.connect(url);
  const channel = await connection.createChannel();
  await channel.checkExchange(exchange); // Courier declares it; only look it up
  await channel.assertQueue(queue, { durable: true, arguments: { "x-queue-type": "quorum" } });
  await channel.bindQueue(queue, exchange, "upload.*"); // upload.succeeded, upload.failed
  console.error(`consume.js: waiting for events on ${queue}`);
  let seen = 0;
  await channel.consume(queue, async (message) => {
    const event = JSON.parse(message.content.toString("utf8"));
    console.log(JSON.stringify(event));
    channel.ack(message);
    seen += 1;
    if (seen >= count) {
      await channel.close();
      await connection.close();
    }
  });
}

main().catch((error) => {
  console.error(`consume.js: ${error.message}`);
  process.exit(1);
});
