// node-postgres listener for tests/test_listen_node.py: LISTEN on a channel,
// print "ready" once listening, then one line per notification payload, and
// exit after COUNT of them (or after TIMEOUT_MS, with what it got).
const { Client } = require("pg");

async function main() {
  const [url, channel, count, timeoutMs] = process.argv.slice(2);
  const want = Number(count);
  const client = new Client({ connectionString: url });
  await client.connect();
  let got = 0;
  const timer = setTimeout(() => {
    console.error(`timeout after ${got} notifications`);
    process.exit(2);
  }, Number(timeoutMs));
  client.on("notification", (msg) => {
    process.stdout.write(`${msg.payload}\n`);
    got += 1;
    if (got >= want) {
      clearTimeout(timer);
      client.end().then(() => process.exit(0));
    }
  });
  await client.query(`LISTEN ${channel}`);
  process.stdout.write("ready\n");
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
