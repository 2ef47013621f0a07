// ThreadSanitizer suppressions, linked into every binary under --config=tsan (through
// --custom_malloc, which adds this library to every link without replacing malloc).
//
// gRPC and Abseil come from Debian uninstrumented, so TSAN cannot see the synchronization inside
// them and reports their internal handoffs as races; these lines silence reports whose stacks are
// inside those libraries. A limit to know: absl::Mutex itself is uninstrumented, so TSAN does not
// see the happens-before edges it creates in our code either; TSAN runs are exact only for code
// that synchronizes through std:: primitives and atomics (which are compiled into our own objects).
extern "C" const char* __tsan_default_suppressions() {
  return "called_from_lib:libgrpc.so\n"
         "called_from_lib:libgpr.so\n"
         "called_from_lib:libgrpc++.so\n"
         "race:grpc_event_engine\n"
         "race:grpc_core\n"
         "race:absl::\n"
         "race:libabsl_\n"
         "race:libgrpc\n"
         "race:libgpr\n";
}
