// Benchmark harness only (`node --require bench/node_loopback.cjs ...`): the reference gateway calls
// `server.listen(port, callback)`, which listens on every interface. On a shared machine the
// benchmark's servers listen on 127.0.0.1 only, like the Python ones (HOST=127.0.0.1), so this adds
// that host to a `listen(port)` / `listen(port, callback)` call. Nothing else is changed: the
// relay, auth and registry code run as written.
'use strict';
const net = require('net');

const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === 'number' && (args.length === 1 || typeof args[1] === 'function')) {
    args.splice(1, 0, '127.0.0.1');
  }
  return listen.apply(this, args);
};
