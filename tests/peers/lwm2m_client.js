// An LwM2M client built on lwm2m-node-lib (Telefonica), driven by the tests:
//   node lwm2m_client.js HOST PORT ENDPOINT LIFETIME
// registers with the server at HOST:PORT with Device (/3/0) and Temperature (/3303/0),
// prints one JSON line per event on stdout, and takes commands on stdin, one per line:
// "update", "set OBJECT-URI RESOURCE VALUE", "deregister". It exits after
// de-registering or when stdin closes.
'use strict';

var lwm2m = require('lwm2m-node-lib').client;
var readline = require('readline');

var host = process.argv[2], port = process.argv[3];
var endpoint = process.argv[4], lifetime = process.argv[5] || '300';
var device = null;

function say(doc) {
    process.stdout.write(JSON.stringify(doc) + '\n');
}

function done(what) {
    return function (error, info) {
        if (error) {
            say({event: what, error: String(error.message || error.name || error)});
            return;
        }
        if (info) {
            device = info;
        }
        say({event: what, location: device && device.location});
    };
}

lwm2m.init({
    logLevel: 'FATAL',
    client: {lifetime: lifetime, version: '1.0', logLevel: 'FATAL', ipProtocol: 'udp4',
             serverProtocol: 'udp4', observe: {period: 3000}}
});

lwm2m.registry.create('/3/0', function () {
    lwm2m.registry.setResource('/3/0', '0', 'devid-agent tests', function () {
        lwm2m.registry.create('/3303/0', function () {
            lwm2m.registry.setResource('/3303/0', '5700', '21.5', function () {
                lwm2m.register(host, port, '', endpoint, done('registered'));
            });
        });
    });
});

readline.createInterface({input: process.stdin}).on('line', function (line) {
    var command = line.trim();
    if (command === 'update') {
        lwm2m.update(device, done('updated'));
    } else if (command.indexOf('set ') === 0) {
        // "set /3303/0 5700 22.0": a new value; observers are notified of it
        var words = command.split(' ');
        lwm2m.registry.setResource(words[1], words[2], words[3], function (error) {
            say({event: 'set', error: error ? String(error) : null});
        });
    } else if (command === 'deregister') {
        lwm2m.unregister(device, function (error) {
            say({event: 'deregistered', error: error ? String(error) : null});
            process.exit(0);
        });
    }
}).on('close', function () {
    process.exit(0);
});
