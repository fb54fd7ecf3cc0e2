// Publish one upload request to Courier, the way Courier asks producers to:
//  - never declare the request queue (Courier owns its arguments): look it up
//    passively, so a missing queue is an error here and not a new, wrong queue;
//  - persistent (deliveryMode 2), so the request survives a broker restart;
//  - on a confirm channel, waiting for the broker's confirm before calling it sent;
//  - mandatory, so a request that no queue takes comes back instead of vanishing.
//
//   COURIER_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/ node publish.js request.json
import { readFile } from "node:fs/promises";
import { randomUUID } from "node:crypto";
import amqp from "amqplib";

const url = process.env.COURIER_AMQP_URL ?? "amqp://guest:guest@127.0.0.1:5672/";
const queue = process.env.COURIER_QUEUE ?? "courier.uploads";

async function main(path) {
  const body = await readFile(path);
  const request = JSON.parse(body);
  const connection = await amqp.connect(url);
  try {
    const channel = await connection.createConfirmChannel();
    await channel.checkQueue(queue); // passive: fails with 404 NOT_FOUND when it is missing
    let returned = false;
    channel.on("return", () => { returned = true; });
    channel.publish("", queue, body, {
      persistent: true,
      mandatory: true,
      contentType: "application/json",
      messageId: request.id ?? randomUUID(),
    });
    await channel.waitForConfirms();
    if (returned) throw new Error(`no queue took the request (is ${queue} right?)`);
    console.log(JSON.stringify({ submitted: request.id ?? null, queue }));
  } finally {
    await connection.close().catch(() => {});
  }
}

main(process.argv[2]).catch((error) => {
  console.error(`publish.js: ${error.message}`);
  process.exit(1);
});
