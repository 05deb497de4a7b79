// An LwM2M server built on lwm2m-node-lib (Telefonica), driven by the tests:
//   node lwm2m_server.js PORT
// listens on 127.0.0.1:PORT (plain CoAP: the tests put a DTLS relay in front), prints one
// JSON line per event on stdout (registration, update, unregistration, and the results of
// commands), and takes commands on stdin, one per line:
//   "read ENDPOINT PATH", "write ENDPOINT PATH VALUE", "observe ENDPOINT PATH",
//   "list".
// A PATH has three or more segments: /PREFIX/3303/0/5700 is read as object type
// "PREFIX/3303", instance 0, resource 5700, which the library puts in the request's path
// as it is. It exits when stdin closes.
'use strict';

var lwm2m = require('lwm2m-node-lib').server;
var readline = require('readline');

var port = parseInt(process.argv[2], 10);

function say(doc) {
    process.stdout.write(JSON.stringify(doc) + '\n');
}

function split(path) {
    var segments = path.replace(/^\//, '').split('/');
    var resource = segments.pop(), instance = segments.pop();
    return [segments.join('/'), instance, resource];
}

function withDevice(endpoint, command, then) {
    lwm2m.getDevice(endpoint, function (error, device) {
        if (error) {
            say({event: command, error: String(error.name || error)});
        } else {
            then(device);
        }
    });
}

var config = {
    port: port, udpWindow: 100, logLevel: 'FATAL', serverProtocol: 'udp4',
    ipProtocol: 'udp4', defaultType: 'Device', formats: [], writeFormat: 'text/plain',
    writeAcceptFormat: 'text/plain', types: [], lifetimeCheckInterval: 1000,
    // Reads ask for text: node-coap 0.22 under the library throws on a Content-Format it
    // does not know (SenML, 110 and 112, among them) and the process dies.
    defaultAcceptFormat: 'text/plain',
    deviceRegistry: {type: 'memory'}
};

lwm2m.start(config, function (error, info) {
    if (error) {
        say({event: 'listening', error: String(error)});
        process.exit(1);
    }
    lwm2m.setHandler(info, 'registration', function (endpoint, lifetime, version, binding,
                                                     payload, callback) {
        say({event: 'registration', endpoint: endpoint, lifetime: lifetime,
             version: version, binding: binding, payload: payload});
        callback();
    });
    lwm2m.setHandler(info, 'updateRegistration', function (device, payload, callback) {
        say({event: 'update', endpoint: device.name, address: device.address,
             port: device.port, payload: payload});
        callback();
    });
    lwm2m.setHandler(info, 'unregistration', function (device, callback) {
        say({event: 'unregistration', endpoint: device.name});
        callback();
    });
    say({event: 'listening', port: port});
});

var commands = readline.createInterface({input: process.stdin});
commands.on('close', function () {
    process.exit(0);
});
commands.on('line', function (line) {
    var words = line.trim().split(' ');
    var command = words[0];
    if (command === 'list') {
        lwm2m.listDevices(function (error, devices) {
            say({event: 'list', endpoints: (devices || []).map(function (d) {
                return d.name; })});
        });
        return;
    }
    var parts = split(words[2] || '');
    withDevice(words[1], command, function (device) {
        if (command === 'read') {
            lwm2m.read(device.id, parts[0], parts[1], parts[2], function (error, value) {
                say({event: 'read', path: words[2], value: error ? null : value,
                     error: error ? String(error.name + ' ' + (error.message || '')) : null});
            });
        } else if (command === 'write') {
            lwm2m.write(device.id, parts[0], parts[1], parts[2], words[3], function (error) {
                say({event: 'write', path: words[2],
                     error: error ? String(error.name + ' ' + (error.message || '')) : null});
            });
        } else if (command === 'observe') {
            lwm2m.observe(device.id, parts[0], parts[1], parts[2], function (value) {
                say({event: 'notify', path: words[2], value: value});
            }, function (error, value) {
                say({event: 'observe', path: words[2], value: error ? null : value,
                     error: error ? String(error.name + ' ' + (error.message || '')) : null});
            });
        } else {
            say({event: command, error: 'unknown command'});
        }
    });
});
